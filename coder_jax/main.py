"""gin entry point: flags only, the logic lives in the library.

    python -m coder_jax.main --gin_file=gin_configs/experiments/tiny_pretrain.gin
        [--gin_file=...] [--gin.NAME=VALUE ...] [--gin_search_paths=DIR1,DIR2] [--dry_run]

--dry_run resolves the config and prints the mesh, parameter counts and per-device memory of
parameters + optimizer state without training. Multi-host runs are joined from the launchers'
environment (coder_jax.parallel.distributed).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_flags(argv):
  ap = argparse.ArgumentParser(prog="python -m coder_jax.main", description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", action="append", default=[], help="repeatable")
  ap.add_argument("--dry_run", action="store_true", help="print mesh and memory, do not train")
  ap.add_argument("--gin_search_paths", default=REPO_ROOT,
                  help="comma-separated directories for gin_file and include paths")
  args, rest = ap.parse_known_args(argv)
  bindings = []
  for a in rest:
    if not a.startswith("--gin.") or "=" not in a:
      ap.error(f"unrecognised argument {a!r} (bindings look like --gin.NAME=VALUE)")
    bindings.append(a[len("--gin."):])
  if not args.gin_file:
    ap.error("at least one --gin_file is required")
  return args, bindings


def main(argv=None):
  args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
  from coder_jax.parallel.distributed import initialize_from_env
  initialize_from_env()
  from coder_jax.stages import launch, register_all
  register_all()
  from coder_jax.gin_flags import parse
  parse(args.gin_file, bindings, args.gin_search_paths.split(","))
  return launch(dry_run=args.dry_run)


def run(argv=None) -> int:
  """main() with errors a user can fix reported as one line and exit status 2."""
  from coder_jax.cli import exit_status
  return exit_status(main, argv)


if __name__ == "__main__":
  sys.exit(run())
