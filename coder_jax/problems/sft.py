"""SFT conversations from the problem set: the user gives a function's signature and docstring,
the assistant answers with its body (the completion convention GRPO samples and the sandbox
scores: prompt + body + tests), so SFT, the reward model and GRPO see one format.

    python -m coder_jax.problems.sft [--split train] [--out coder_jax/problems/data/sft_train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os

from coder_jax.problems.problem import load


def conversation(problem) -> dict:
  return {"messages": [{"role": "user", "content": problem.prompt},
                       {"role": "assistant", "content": problem.canonical_solution}]}


def default_out(split: str = "train") -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"sft_{split}.jsonl")


def write(path: str, split: str = "train") -> int:
  problems, _ = load(split=split)
  rows = [conversation(p) for p in problems if p.canonical_solution]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return len(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m coder_jax.problems.sft", description=__doc__)
  ap.add_argument("--split", default="train")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  out = args.out or default_out(args.split)
  print(f"wrote {write(out, args.split)} conversations to {out}")


if __name__ == "__main__":
  main()
