"""Command line for Hugging Face conversion, both directions.

    python -m coder_jax.hf import --hf_dir HF_DIR --out CKPT_DIR [--dtype float32]
    python -m coder_jax.hf export --checkpoint CKPT_DIR --out HF_DIR [--dtype bfloat16]
    python -m coder_jax.hf export --train_dir MODEL_DIR [--step N] --out HF_DIR  # a training run
    (a reward_model run's MODEL_DIR is written as DeepseekV2ForSequenceClassification)
    python -m coder_jax.hf export --preset tiny --seed 0 --out HF_DIR     # a fresh random model

Export writes the tokenizer too (--tokenizer, default: the source's tokenizer.json), so
transformers' AutoTokenizer and pipeline("text-generation") work on HF_DIR; import keeps it.
--overwrite replaces only an earlier export, never the source or a directory holding other files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp

from coder_jax import hf
from coder_jax.cli import command, exit_status
from coder_jax.data.tokenizer import load_tokenizer
from coder_jax.hf.tokenizer_files import TOKENIZER_FILES, TOKENIZER_JSON
from coder_jax.model.checkpoint import load_model, save_model
from coder_jax.model.config import PRESETS, get_config
from coder_jax.model.decoder import init_model
from coder_jax.model.info import report


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m coder_jax.hf", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  imp = sub.add_parser("import", help="Hub checkpoint -> coder_jax checkpoint")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--out", required=True)
  imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  exp = sub.add_parser("export", help="coder_jax checkpoint (or a fresh preset) -> Hub checkpoint")
  src = exp.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint")
  src.add_argument("--preset", choices=sorted(PRESETS))
  src.add_argument("--train_dir", help="a training MODEL_DIR (its latest checkpoint)")
  exp.add_argument("--step", type=int, help="with --train_dir: this checkpoint step")
  exp.add_argument("--seed", type=int, default=0)
  exp.add_argument("--out", required=True)
  exp.add_argument("--tokenizer", help="the model's tokenizer.json (default: the source's "
                   "tokenizer.json, if it has one)")
  exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--overwrite", action="store_true",
                   help="replace an earlier HF export at --out (nothing else)")
  return ap


def _import(args) -> None:
  model = hf.load(args.hf_dir, dtype=jnp.dtype(args.dtype))
  files = hf.load_tokenizer_files(args.hf_dir)   # checked before anything is written
  print(report(model.cfg, args.hf_dir))
  out = save_model(model, args.out)
  if files is not None:
    # Beside the model, so a later export (and decode) find the same tokenizer.
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(args.hf_dir, name)):
        shutil.copyfile(os.path.join(args.hf_dir, name), os.path.join(out, name))
  print(f"saved {out}" + ("" if files is None else f" (with {TOKENIZER_JSON})"))


def _export(args) -> None:
  source = args.train_dir or args.checkpoint
  tokenizer = args.tokenizer
  if tokenizer is None and source and os.path.isfile(os.path.join(source, TOKENIZER_JSON)):
    tokenizer = os.path.join(source, TOKENIZER_JSON)
  sources = [source] if source else []
  # Refuse a bad target or tokenizer before spending minutes loading the model.
  hf.check_target(os.path.abspath(args.out), overwrite=args.overwrite, sources=sources)
  if tokenizer is not None:
    load_tokenizer(tokenizer)
  if args.train_dir:
    from coder_jax.reward.scorer import has_reward_head, train_dir_model
    if has_reward_head(args.train_dir, args.step):   # a reward_model run: its own architecture
      from coder_jax.hf import seq_cls
      out = seq_cls.save(train_dir_model(args.train_dir, args.step), args.out, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                         tokenizer=tokenizer, sources=sources)
      print(f"saved {out} ({seq_cls.ARCHITECTURE})")
      return
    from coder_jax.train.checkpoint import load_params
    model, step = load_params(args.train_dir, args.step)
    print(f"loaded step {step} of {args.train_dir}")
  elif args.checkpoint:
    model = load_model(args.checkpoint)
  else:
    model = init_model(get_config(args.preset), seed=args.seed)
  out = hf.save(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                overwrite=args.overwrite, tokenizer=tokenizer, sources=sources)
  if tokenizer is None:
    print(f"note: no tokenizer given; {out} holds config and weights only (pass --tokenizer)",
          file=sys.stderr)
  print(f"saved {out}" + ("" if tokenizer is None else f" (tokenizer: {tokenizer})"))


def _main(argv=None) -> None:
  args = _parser().parse_args(argv)
  _import(args) if args.cmd == "import" else _export(args)


def main(argv=None) -> int:
  """0, or 2 after one `error:` line for an error a user can fix (coder_jax/cli.py)."""
  return exit_status(_main, argv)


if __name__ == "__main__":
  sys.exit(command(_main))
