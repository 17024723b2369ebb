"""Data command line.

    python -m coder_jax.data build --source PATH [--source PATH ...] --out DATA_DIR
        [--vocab_size 8192 | --tokenizer tokenizer.json] [--max_file_bytes N] [--c_headers]
    python -m coder_jax.data show --data_dir DATA_DIR [--dataset NAME] --seq_len N --num K

`build` without --source uses the embedded default corpus (this interpreter's standard library).
It prints the build statistics and the dataset's name, and leaves the dataset plus
`tokenizer.json` in DATA_DIR. `show` prints K packed rows decoded, one segment per line, with FIM
markers visible; --dataset picks one build when DATA_DIR holds several.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys

from coder_jax.cli import command, exit_status
from coder_jax.data.layout import (STATS_NAME, TOKENIZER_NAME, corpus_name, find_dataset,
                                   tokenizer_of)


def _flag(flag: str, fn, *args):
  """fn(*args), its ValueError / FileNotFoundError message prefixed with the flag it concerns."""
  try:
    return fn(*args)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"{flag}: {e}") from None


def check_build_flags(args) -> None:
  """Everything that can be told wrong before reading a corpus (which can take hours)."""
  from coder_jax.data.tokenizer import load_tokenizer, min_vocab_size, resolve_path
  probe = os.path.abspath(args.out)
  while not os.path.exists(probe):  # the nearest existing ancestor decides
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"--out: {args.out}: {probe} is a file; --out must be a directory (new or a "
                     "DATA_DIR)")
  if not os.access(probe, os.W_OK):
    raise PermissionError(f"--out: {args.out}: {probe} is not writable")
  for src in args.source:
    if not os.path.exists(src):
      raise FileNotFoundError(f"--source: {src} does not exist")
  if args.tokenizer:
    _flag("--tokenizer", load_tokenizer, args.tokenizer)
    mine = os.path.join(args.out, TOKENIZER_NAME)
    if os.path.exists(mine) and not filecmp.cmp(resolve_path(args.tokenizer), mine,
                                                 shallow=False):
      raise ValueError(f"--tokenizer: {mine} exists and differs from {args.tokenizer}; a DATA_DIR "
                       "keeps one tokenizer: build into another --out")
  elif (args.vocab_size < min_vocab_size()
        and not os.path.exists(os.path.join(args.out, TOKENIZER_NAME))):  # else not trained
    raise ValueError(f"--vocab_size: must be at least {min_vocab_size()} (256 byte symbols and "
                     f"the special tokens), got {args.vocab_size}")
  for flag, v, low in (("--max_file_bytes", args.max_file_bytes, 1),
                       ("--max_doc_chars", args.max_doc_chars, 2),
                       ("--tokenizer_docs", args.tokenizer_docs, 1)):
    if v < low:
      raise ValueError(f"{flag}: must be at least {low}, got {v}")
  if not 0 <= args.validation_fraction < 1:
    raise ValueError(f"--validation_fraction: must be in [0, 1), got {args.validation_fraction}")


def cmd_build(args) -> None:
  from coder_jax.data.corpus import BuildStats
  from coder_jax.data.prepare import prepare
  check_build_flags(args)
  dataset_dir, tok_path = prepare(
      args.out, args.source, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
      max_file_bytes=args.max_file_bytes, validation_fraction=args.validation_fraction,
      tokenizer_docs=args.tokenizer_docs, c_headers=args.c_headers,
      max_doc_chars=args.max_doc_chars)
  print(BuildStats.load(os.path.join(dataset_dir, STATS_NAME)).format())
  print(f"dataset   {dataset_dir}\nname      {corpus_name(dataset_dir)}   (CodeData.dataset, "
        f"--dataset)\ntokenizer {tok_path}")


def cmd_show(args) -> None:
  from coder_jax.data.fim import FimConfig
  from coder_jax.data.pipeline import DataConfig, Pipeline
  from coder_jax.data.tokenizer import make_vocabulary
  dataset_dir = find_dataset(args.data_dir, args.dataset)
  tok = args.tokenizer or tokenizer_of(dataset_dir)
  if not os.path.exists(tok):
    raise FileNotFoundError(f"--tokenizer: {tok} is missing; pass the tokenizer the data was "
                            "built with")
  cfg = DataConfig(dataset_dir, tok, seq_len=args.seq_len, batch_size=1, split=args.split,
                   seed=args.seed, fim=FimConfig(rate=args.fim_rate))
  vocab = _flag("--tokenizer", make_vocabulary, tok)
  pipe = Pipeline(cfg)
  try:
    for row in range(args.num):
      _print_row(next(pipe), row, args, vocab)
  finally:
    pipe.close()


def _print_row(batch, row, args, vocab) -> None:
  b = {k: v[0] for k, v in batch.items()}
  used = int((b["segment_ids"] > 0).sum())
  print(f"=== row {row}: {used}/{args.seq_len} tokens used, "
        f"{len(set(b['segment_ids'][b['segment_ids'] > 0].tolist()))} segments")
  for seg in sorted(set(b["segment_ids"].tolist()) - {0}):
    toks = b["targets"][b["segment_ids"] == seg].tolist()
    text = vocab.tokenizer.decode(toks, skip_special_tokens=False)
    print(f"--- segment {seg} ({len(toks)} tokens)")
    print(json.dumps(text[:args.max_chars], ensure_ascii=False)
          + (" ..." if len(text) > args.max_chars else ""))


def parse_flags(argv=None):
  from coder_jax.data.corpus import MAX_DOC_CHARS
  ap = argparse.ArgumentParser(prog="python -m coder_jax.data", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="read a corpus into a TFDS dataset and train a tokenizer")
  b.add_argument("--source", action="append", default=[], help="directory or .jsonl(.gz); repeatable")
  b.add_argument("--out", required=True)
  b.add_argument("--c_headers", action="store_true", help="default corpus: add /usr/include")
  b.add_argument("--max_file_bytes", type=int, default=1 << 20)
  b.add_argument("--max_doc_chars", type=int, default=MAX_DOC_CHARS,
                 help="longer documents are stored as consecutive parts of at most this size")
  b.add_argument("--validation_fraction", type=float, default=0.01)
  b.add_argument("--tokenizer", help="an existing tokenizer.json (e.g. DeepSeek's) to use")
  b.add_argument("--vocab_size", type=int, default=8192)
  b.add_argument("--tokenizer_docs", type=int, default=2000, help="documents to train it on")
  s = sub.add_parser("show", help="print packed examples decoded")
  s.add_argument("--data_dir", required=True)
  s.add_argument("--dataset", help="which build, when DATA_DIR holds several (`build` prints it)")
  s.add_argument("--tokenizer")
  s.add_argument("--seq_len", type=int, default=512)
  s.add_argument("--num", type=int, default=2)
  s.add_argument("--split", default="train")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--fim_rate", type=float, default=0.5)
  s.add_argument("--max_chars", type=int, default=400)
  return ap.parse_args(argv)


def _main(argv=None) -> None:
  args = parse_flags(argv)
  (cmd_build if args.cmd == "build" else cmd_show)(args)


def main(argv=None) -> int:
  """0, or 2 after one `error:` line for an error a user can fix (coder_jax/cli.py)."""
  return exit_status(_main, argv)


if __name__ == "__main__":
  sys.exit(command(_main))
