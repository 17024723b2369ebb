"""Data command line.

    python -m coder_jax.data build --source PATH [--source PATH ...] --out DATA_DIR
        [--vocab_size 8192 | --tokenizer tokenizer.json] [--max_file_bytes N] [--c_headers]
    python -m coder_jax.data show --data_dir DATA_DIR --seq_len N --num K [--fim_rate 0.5]

`build` without --source uses the embedded default corpus (this interpreter's standard library).
It prints the build statistics and leaves the dataset plus `tokenizer.json` in DATA_DIR.
`show` prints K packed rows decoded, one segment per line, with FIM markers visible.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def find_dataset(data_dir: str) -> str:
  """The dataset directory under DATA_DIR (the one holding build_stats.json)."""
  if os.path.exists(os.path.join(data_dir, "build_stats.json")):
    return data_dir
  found = sorted(glob.glob(os.path.join(data_dir, "code_corpus", "*", "*", "build_stats.json")))
  if not found:
    raise FileNotFoundError(f"{data_dir}: no built corpus (run `python -m coder_jax.data build`)")
  if len(found) > 1:
    raise ValueError(f"{data_dir}: holds {len(found)} corpora; pass one of "
                     + ", ".join(os.path.dirname(f) for f in found))
  return os.path.dirname(found[0])


def cmd_build(args) -> None:
  from coder_jax.data.builder import STATS_NAME
  from coder_jax.data.corpus import BuildStats
  from coder_jax.data.prepare import prepare
  dataset_dir, tok_path = prepare(
      args.out, args.source, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
      max_file_bytes=args.max_file_bytes, validation_fraction=args.validation_fraction,
      tokenizer_docs=args.tokenizer_docs, c_headers=args.c_headers)
  print(BuildStats.load(os.path.join(dataset_dir, STATS_NAME)).format())
  print(f"dataset   {dataset_dir}\ntokenizer {tok_path}")


def cmd_show(args) -> None:
  from coder_jax.data.fim import FimConfig
  from coder_jax.data.pipeline import DataConfig, Pipeline
  from coder_jax.data.tokenizer import make_vocabulary
  dataset_dir = find_dataset(args.data_dir)
  tok = args.tokenizer or os.path.join(args.data_dir, "tokenizer.json")
  cfg = DataConfig(dataset_dir, tok, seq_len=args.seq_len, batch_size=1, split=args.split,
                   seed=args.seed, fim=FimConfig(rate=args.fim_rate))
  vocab = make_vocabulary(tok)
  pipe = Pipeline(cfg)
  for row in range(args.num):
    b = {k: v[0] for k, v in next(pipe).items()}
    used = int((b["segment_ids"] > 0).sum())
    print(f"=== row {row}: {used}/{args.seq_len} tokens used, "
          f"{len(set(b['segment_ids'][b['segment_ids'] > 0].tolist()))} segments")
    for seg in sorted(set(b["segment_ids"].tolist()) - {0}):
      toks = b["targets"][b["segment_ids"] == seg].tolist()
      text = vocab.tokenizer.decode(toks, skip_special_tokens=False)
      print(f"--- segment {seg} ({len(toks)} tokens)")
      print(json.dumps(text[:args.max_chars], ensure_ascii=False)
            + (" ..." if len(text) > args.max_chars else ""))


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  ap = argparse.ArgumentParser(prog="python -m coder_jax.data", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="read a corpus into a TFDS dataset and train a tokenizer")
  b.add_argument("--source", action="append", default=[], help="directory or .jsonl(.gz); repeatable")
  b.add_argument("--out", required=True)
  b.add_argument("--c_headers", action="store_true", help="default corpus: add /usr/include")
  b.add_argument("--max_file_bytes", type=int, default=1 << 20)
  b.add_argument("--validation_fraction", type=float, default=0.01)
  b.add_argument("--tokenizer", help="an existing tokenizer.json (e.g. DeepSeek's) to use")
  b.add_argument("--vocab_size", type=int, default=8192)
  b.add_argument("--tokenizer_docs", type=int, default=2000, help="documents to train it on")
  s = sub.add_parser("show", help="print packed examples decoded")
  s.add_argument("--data_dir", required=True)
  s.add_argument("--tokenizer")
  s.add_argument("--seq_len", type=int, default=512)
  s.add_argument("--num", type=int, default=2)
  s.add_argument("--split", default="train")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--fim_rate", type=float, default=0.5)
  s.add_argument("--max_chars", type=int, default=400)
  args = ap.parse_args(argv)
  try:
    (cmd_build if args.cmd == "build" else cmd_show)(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
