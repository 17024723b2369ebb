"""Sandbox throughput: checks per second of a trivial program through check_many.

    python benchmarks/sandbox_throughput.py [--n 100] [--workers 1,2,4] [--isolation auto]

The program is `def f(): return 1` and the test `assert f() == 1`, so the numbers are the
sandbox's own cost per check (interpreter start, namespaces, mounts, cgroup, teardown), the
ceiling for RL reward / eval throughput on this machine. Prints one row per worker count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coder_jax import sandbox  # noqa: E402

PROGRAM = "def f():\n  return 1\n"
TEST = "assert f() == 1\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=100, help="checks per row")
  ap.add_argument("--workers", default=None,
                  help="comma-separated worker counts (default: 1, cores/2, cores, 2*cores)")
  ap.add_argument("--isolation", default="auto", choices=("auto",) + sandbox.MODES)
  args = ap.parse_args()
  cores = os.cpu_count() or 1
  workers = ([int(w) for w in args.workers.split(",")] if args.workers
             else sorted({1, max(1, cores // 2), cores, 2 * cores}))
  isolation = None if args.isolation == "auto" else args.isolation
  caps = sandbox.capabilities()
  print(f"cores {cores}; process cap: {caps['process_cap'][isolation or caps['isolation']]}; "
        f"cgroup {caps['cgroup']}")
  sandbox.check(PROGRAM, TEST, isolation=isolation)  # warm: probe, page cache, pyc files
  print(f"| {'isolation':10} | {'workers':>7} | {'checks':>6} | {'seconds':>7} | {'checks/s':>8} |")
  print(f"|{'-' * 12}|{'-' * 9}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
  for w in workers:
    t0 = time.perf_counter()
    rs = sandbox.check_many([(PROGRAM, TEST)] * args.n, max_workers=w, isolation=isolation)
    dt = time.perf_counter() - t0
    bad = [r for r in rs if not r.passed]
    if bad:
      raise SystemExit(f"{len(bad)} trivial checks did not pass: {bad[0]}")
    print(f"| {rs[0].isolation:10} | {w:7d} | {args.n:6d} | {dt:7.2f} | {args.n / dt:8.1f} |")


if __name__ == "__main__":
  main()
