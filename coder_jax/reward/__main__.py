"""Reward-model command line: build its data, export it, score with it.

    python -m coder_jax.reward build --policy DIR --out FILE [--problems FILE] [--split train]
        [--samples 4] [--temperature 0.8] [--max_new_tokens 128] [--include_reference]
        [--pairs] [--limit N] [--seed 0] [--batch_size 64] [--timeout_s 5] [--overwrite]
    python -m coder_jax.reward export --train_dir MODEL_DIR --out HF_DIR [--step N]
        [--dtype bfloat16] [--pad_token_id ID] [--overwrite]
    python -m coder_jax.reward score --model DIR --prompt P --response R [--prompt P --response R]

build: samples from a policy (an SFT run's MODEL_DIR or an HF dir; coder_jax/reward/build.py)
and writes JSONL records for gin_configs/runs/reward_model.gin (default problems: the built-in
set's train split). export: a reward_model run as transformers'
DeepseekV2ForSequenceClassification with the run's tokenizer. score: one logit per pair (the RM's
training directory or export). Errors a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_flags(argv):
  ap = argparse.ArgumentParser(prog="python -m coder_jax.reward",
                               description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="records from a policy's samples, labelled by the sandbox")
  b.add_argument("--policy", required=True, help="SFT run's MODEL_DIR or an HF directory")
  b.add_argument("--step", type=int, help="with a training MODEL_DIR: this checkpoint step")
  b.add_argument("--problems", help="problems JSONL (default: the built-in set)")
  b.add_argument("--split", default="train", choices=["train", "heldout", "all"])
  b.add_argument("--limit", type=int, help="only the first N problems")
  b.add_argument("--samples", type=int, default=4, help="samples per problem")
  b.add_argument("--temperature", type=float, default=0.8)
  b.add_argument("--max_new_tokens", type=int, default=128)
  b.add_argument("--include_reference", action="store_true",
                 help="also each problem's canonical solution and an empty body `pass`")
  b.add_argument("--pairs", action="store_true",
                 help="pairwise records (a passing vs a failing response of one prompt)")
  b.add_argument("--seed", type=int, default=0)
  b.add_argument("--batch_size", type=int, default=64, help="rows per sampling batch")
  b.add_argument("--timeout_s", type=float, default=5.0, help="per program in the sandbox")
  b.add_argument("--out", required=True)
  b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  e = sub.add_parser("export", help="reward_model MODEL_DIR -> HF sequence-classification dir")
  e.add_argument("--train_dir", required=True)
  e.add_argument("--step", type=int)
  e.add_argument("--out", required=True)
  e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  e.add_argument("--pad_token_id", type=int,
                 help="default: the tokenizer's pad token (never EOS)")
  e.add_argument("--overwrite", action="store_true",
                 help="replace an earlier HF export at --out (nothing else)")
  s = sub.add_parser("score", help="score (prompt, response) pairs")
  s.add_argument("--model", required=True, help="reward_model MODEL_DIR or its HF export")
  s.add_argument("--step", type=int)
  s.add_argument("--prompt", action="append", default=[], help="repeatable, one per --response")
  s.add_argument("--response", action="append", default=[])
  return ap.parse_args(argv)


def _export(args):
  from coder_jax.hf import check_target, seq_cls
  from coder_jax.reward.scorer import train_dir_model
  if not os.path.isdir(args.train_dir):
    raise FileNotFoundError(f"--train_dir: {args.train_dir}: no such directory")
  tok = os.path.join(args.train_dir, "tokenizer.json")
  if not os.path.isfile(tok):
    raise FileNotFoundError(f"--train_dir: {args.train_dir} has no tokenizer.json (the export "
                            "needs the run's tokenizer)")
  try:   # refused before the model loads
    check_target(os.path.abspath(args.out), overwrite=args.overwrite, sources=[args.train_dir])
  except FileExistsError as err:
    raise ValueError(str(err)) from None
  rm = train_dir_model(args.train_dir, args.step)
  out = seq_cls.save(rm, args.out, pad_token_id=args.pad_token_id, dtype=args.dtype,
                     overwrite=args.overwrite, tokenizer=tok, sources=[args.train_dir])
  print(f"saved {out} (DeepseekV2ForSequenceClassification, tokenizer: {tok})")


def _score(args):
  from coder_jax.reward import load
  if not args.prompt or len(args.prompt) != len(args.response):
    raise ValueError(f"score: give --prompt and --response in pairs (got {len(args.prompt)} "
                     f"prompts, {len(args.response)} responses)")
  if not os.path.isdir(args.model):
    raise FileNotFoundError(f"--model: {args.model}: no such directory")
  for s in load(args.model, step=args.step).score(args.prompt, args.response):
    print(f"{float(s):.6g}")


def main(argv=None) -> None:
  args = parse_flags(argv)
  if args.cmd == "build":
    from coder_jax.reward.build import build
    build(args.policy, args.out, problems_path=args.problems,
          split=None if args.split == "all" else args.split, limit=args.limit,
          samples=args.samples, temperature=args.temperature,
          max_new_tokens=args.max_new_tokens, include_reference=args.include_reference,
          pairs=args.pairs, seed=args.seed, batch_size=args.batch_size,
          timeout_s=args.timeout_s, overwrite=args.overwrite, step=args.step)
  elif args.cmd == "export":
    _export(args)
  else:
    _score(args)


def run(argv=None) -> int:
  from coder_jax.cli import exit_status
  return exit_status(main, argv)


if __name__ == "__main__":
  from coder_jax.cli import command
  sys.exit(command(main))
