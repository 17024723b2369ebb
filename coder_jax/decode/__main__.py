"""Generate code from a checkpoint on the command line.

    python -m coder_jax.decode --checkpoint HF_OR_MODEL_DIR [--tokenizer tokenizer.json] \
        --prompt "def fib(n):" [--prompt ...] [--max_new_tokens 128] [--temperature 0.8] \
        [--top_k 0] [--top_p 0.95] [--stop "\ndef "] [--seed 0] [--json]

One completion per prompt (greedy unless --temperature > 0); --json prints one JSON object per
line ({"prompt", "completion"}). User errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _unescape(s: str) -> str:
  # Stop strings like "\ndef " arrive with a literal backslash from the shell.
  return s.encode("utf-8").decode("unicode_escape") if "\\" in s else s


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m coder_jax.decode",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", required=True, help="Hugging Face dir or training MODEL_DIR")
  ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default latest)")
  ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
  ap.add_argument("--allow_tokenizer_mismatch", action="store_true",
                  help="use --tokenizer even though it differs from the checkpoint's own")
  ap.add_argument("--prompt", action="append", default=[])
  ap.add_argument("--prompt_file", default=None, help="a file whose whole text is one prompt")
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--attention_impl", default="auto")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  from coder_jax.decode import generate, load
  prompts = [_unescape(p) for p in args.prompt]
  if args.prompt_file:
    if not os.path.isfile(args.prompt_file):
      raise FileNotFoundError(f"{args.prompt_file}: no such prompt file")
    with open(args.prompt_file, encoding="utf-8") as f:
      prompts.append(f.read())
  if not prompts:
    raise ValueError("give at least one --prompt or --prompt_file")
  model, tok = load(args.checkpoint, step=args.step, tokenizer=args.tokenizer,
                    allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
  if tok is None:
    raise FileNotFoundError(f"{args.checkpoint} has no tokenizer.json; pass --tokenizer")
  outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  stop=[_unescape(s) for s in args.stop], seed=args.seed,
                  attention_impl=args.attention_impl)
  for p, c in zip(prompts, outs):
    if args.json:
      print(json.dumps({"prompt": p, "completion": c}))
    else:
      print(p + c)
      print("-" * 40)


def run(argv=None) -> int:
  from coder_jax.cli import exit_status
  return exit_status(main, argv)


if __name__ == "__main__":
  from coder_jax.cli import command
  sys.exit(command(main))
