"""gin entry point: flags only, the logic lives in the library.

    python -m coder_jax.main --gin_file=gin_configs/experiments/tiny_pretrain.gin
        [--gin_file=...] [--gin.NAME=VALUE ...] [--gin_search_paths=DIR1,DIR2] [--dry_run]
        [--verbose]
        [--compile_topology=v5p-16 [--compile_topology_num_slices=N] [--compile_save=FILE]]

--dry_run resolves the config and prints the mesh, parameter counts and per-device memory of
parameters + optimizer state without training. --compile_topology compiles the stage's real train
step (and GRPO's sampler) ahead of time for a TPU topology on this machine and prints the
compiler's per-device memory, FLOPs and a roofline bound (coder_jax/train/aot.py);
--compile_topology=v5p-auto searches for the smallest v5p slice that fits. Multi-host runs are
joined from the launchers' environment (coder_jax.parallel.distributed). --verbose (or
CODER_JAX_VERBOSE=1) shows the start-up notices of TensorFlow, XLA and CUDA that are otherwise
filtered out (coder_jax/cli.py).
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
  ap.add_argument("--verbose", action="store_true",
                  help="show TensorFlow / XLA / CUDA start-up notices (filtered otherwise)")
  ap.add_argument("--compile_topology", default=None, metavar="NAME",
                  help="compile the train step for a TPU topology (v5p-8, v5p-256, v5e-256, "
                       "v6e-256, ...) on this machine and print its memory; GEN-auto (v5p-auto) "
                       "finds the smallest slice that fits; needs libtpu")
  ap.add_argument("--compile_topology_num_slices", type=int, default=1, metavar="N",
                  help="slices of that topology joined over the data-center network")
  ap.add_argument("--compile_save", default=None, metavar="FILE",
                  help="with --compile_topology: write the serialized executable here")
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
  if args.compile_topology is None and (args.compile_save or args.compile_topology_num_slices != 1):
    ap.error("--compile_save and --compile_topology_num_slices need --compile_topology")
  if args.compile_topology is not None and args.dry_run:
    ap.error("--dry_run and --compile_topology: choose one (the estimate or the compiler's answer)")
  return args, bindings


def main(argv=None):
  args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
  from coder_jax.parallel.distributed import initialize_from_env
  initialize_from_env()
  from coder_jax.stages import launch, register_all
  register_all()
  from coder_jax.gin_flags import parse
  parse(args.gin_file, bindings, args.gin_search_paths.split(","))
  aot = None
  if args.compile_topology is not None:
    from coder_jax.train.aot import CompileRequest, topology_candidates
    topology_candidates(args.compile_topology, args.compile_topology_num_slices)  # fail fast
    aot = CompileRequest(args.compile_topology, args.compile_topology_num_slices,
                         args.compile_save)
  return launch(dry_run=args.dry_run, aot=aot)


def run(argv=None) -> int:
  """main() with errors a user can fix reported as one line and exit status 2."""
  from coder_jax.cli import exit_status
  return exit_status(main, argv)


if __name__ == "__main__":
  from coder_jax.cli import VERBOSE_ENV, command
  if "--verbose" in sys.argv[1:]:
    os.environ[VERBOSE_ENV] = "1"
  sys.exit(command(main))
