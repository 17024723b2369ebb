"""Look at SFT data as training sees it.

    python -m coder_jax.data.chat_cli --data chat.jsonl --tokenizer tokenizer.json
        [--seq_len 4096] [--num 2] [--overlong skip|truncate] [--max_chars 400]

Prints the summary line a run prints (records, examples, tokens, truncated, skipped by reason),
then the first NUM packed rows: each example as its runs of text, the trained ones (the replies
and their EOS, carrying the loss) marked TRAINED, so a template or a loss mask can be checked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

from coder_jax.cli import command, exit_status
from coder_jax.data.chat import ChatData, ChatTemplate
from coder_jax.data.tokenizer import load_tokenizer


def show_row(tok, row: dict, max_chars: int) -> list[str]:
  """Lines describing one packed row: each example's untrained and trained runs, decoded."""
  seg, w = row["segment_ids"], row["loss_weights"]
  lines = [f"=== {int((seg > 0).sum())}/{len(seg)} positions used, {seg.max()} examples, "
           f"{int(w.sum())} trained"]
  for s in range(1, seg.max() + 1):
    idx = np.flatnonzero(seg == s)
    ids = np.concatenate([row["inputs"][idx[:1]], row["targets"][idx]])
    marks = np.concatenate([[0], w[idx]])
    lines.append(f"--- example {s} ({len(idx)} positions)")
    cuts = np.flatnonzero(np.diff(marks)) + 1
    for part, m in zip(np.split(ids, cuts), np.split(marks, cuts)):
      text = tok.decode(part.tolist(), skip_special_tokens=False)
      shown = json.dumps(text[:max_chars], ensure_ascii=False)
      lines.append(f"  {'TRAINED' if m[0] else 'prompt ':<7} {shown}"
                   + (" ..." if len(text) > max_chars else ""))
  return lines


def parse_flags(argv=None):
  ap = argparse.ArgumentParser(prog="python -m coder_jax.data.chat_cli",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--data", required=True, help="chat JSONL (.gz allowed)")
  ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
  ap.add_argument("--seq_len", type=int, default=4096)
  ap.add_argument("--num", type=int, default=2, help="packed rows to print")
  ap.add_argument("--overlong", default="skip", choices=("skip", "truncate"))
  ap.add_argument("--max_chars", type=int, default=400)
  return ap.parse_args(argv)


def _main(argv=None) -> None:
  args = parse_flags(argv)
  data = ChatData(path=args.data, tokenizer=args.tokenizer, template=ChatTemplate(),
                  shuffle=False, epochs=1, overlong=args.overlong)
  tok = load_tokenizer(args.tokenizer)
  n = tok.get_vocab_size(with_added_tokens=True)
  stream = data.open(model_vocab=n, batch_rows=1, seq_len=args.seq_len, shard=0,
                     num_shards=1, start_batch=0)
  for batch in itertools.islice(stream, args.num):
    print("\n".join(show_row(tok, {k: v[0] for k, v in batch.items()}, args.max_chars)))


def main(argv=None) -> int:
  """0, or 2 after one `error:` line for an error a user can fix (coder_jax/cli.py)."""
  return exit_status(_main, argv)


if __name__ == "__main__":
  sys.exit(command(_main))
