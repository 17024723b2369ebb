"""Command line for Hugging Face conversion, both directions.

    python -m coder_jax.hf import --hf_dir HF_DIR --out CKPT_DIR [--dtype float32]
    python -m coder_jax.hf export --checkpoint CKPT_DIR --out HF_DIR [--dtype bfloat16]
    python -m coder_jax.hf export --train_dir MODEL_DIR [--step N] --out HF_DIR  # a training run
    python -m coder_jax.hf export --preset tiny --seed 0 --out HF_DIR     # a fresh random model
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from coder_jax import hf
from coder_jax.model.checkpoint import load_model, save_model
from coder_jax.model.config import PRESETS, get_config
from coder_jax.model.decoder import init_model
from coder_jax.model.info import report


def main(argv=None) -> int:
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
  src.add_argument("--train_dir", help="a pretraining MODEL_DIR (its latest checkpoint)")
  exp.add_argument("--step", type=int, help="with --train_dir: this checkpoint step")
  exp.add_argument("--seed", type=int, default=0)
  exp.add_argument("--out", required=True)
  exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--overwrite", action="store_true")
  args = ap.parse_args(argv)
  try:
    if args.cmd == "import":
      model = hf.load(args.hf_dir, dtype=jnp.dtype(args.dtype))
      print(report(model.cfg, args.hf_dir))
      print(f"saved {save_model(model, args.out)}")
    else:
      if args.train_dir:
        from coder_jax.train.checkpoint import load_params
        model, step = load_params(args.train_dir, args.step)
        print(f"loaded step {step} of {args.train_dir}")
      elif args.checkpoint:
        model = load_model(args.checkpoint)
      else:
        model = init_model(get_config(args.preset), seed=args.seed)
      out = hf.save(model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite)
      print(f"saved {out}")
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
