"""Compiled per-device memory and roofline of the real train steps for TPU pods, in one table.

    python benchmarks/tpu_memory.py                       # every row (tens of minutes on 2 cores)
    python benchmarks/tpu_memory.py --only lite_4k_v5p16,lite_4k_capacity
    python benchmarks/tpu_memory.py --table               # the markdown of the saved rows

Each row runs `python -m coder_jax.main --gin_file=<experiment> --compile_topology=<name>` in
this process (coder_jax/train/aot.py): libtpu's compiler, on this CPU machine, compiles the whole
train step (forward, balance losses, backward, clip, AdamW; `auto` kernels, which on a TPU
target are the Mosaic attention and grouped matmul) for the topology's devices with the
experiment's mesh. Bytes are GiB per device: parameters + optimizer state as --dry_run counts
them (float32, this device's shards), then XLA's memory analysis: arguments (that state as laid
out in tiles, plus the batch), temporaries (activations, workspace), outputs beyond the donated
state, and the total (with the code) against the chip's HBM. The roofline is the larger
of the model's FLOPs (6 x active params + causal attention) at the chip's bf16 peak and XLA's
bytes accessed at its HBM bandwidth (aot.CHIPS cites both); the MFU bound follows from it.
Rows are appended to benchmarks/tpu_memory.json as they finish; --table renders them.
Needs libtpu (scripts/setup.sh requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "tpu_memory.json")

LITE = "gin_configs/experiments/coder_v2_lite_pretrain.gin"
LITE_32K = "gin_configs/experiments/coder_v2_lite_32k.gin"
BIG = "gin_configs/experiments/coder_v2_pretrain.gin"
UNUSED = ["--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'"]

# name: (what, gin file, topology, extra bindings). Lite micro-batches hold one 4K row a chip.
ROWS = {
    "lite_4k_v5p16": ("Lite 4K, expert 8 (dropless)", LITE, "v5p-16", []),
    "lite_4k_capacity": ("Lite 4K, expert 8, capacity 1.25", LITE, "v5p-16",
                         ["--gin.model_config.capacity_factor=1.25"]),
    "lite_4k_v5p32": ("Lite 4K, fsdp 2 x expert 8 (dropless)", LITE, "v5p-32",
                      ["--gin.BATCH_SIZE=128"]),
    "lite_32k_remat": ("Lite 32K, remat full, loss chunks 2048", LITE_32K, "v5p-64",
                       ["--gin.INIT_FROM_CHECKPOINT='/not/here'"]),
    # The smallest v5p slice that fits (aot.smallest_fit); the 236B preset drops tokens at
    # capacity 1.0 with device-limited routing (gin_configs/models/coder_v2.gin).
    "236b_4k_smallest": ("236B 4K, fsdp x expert 8, capacity 1.0", BIG, "v5p-auto", []),
    # The same on the slice found above, with the earlier per-pair capacity rule.
    "236b_4k_pair_rule": ("236B 4K, fsdp x expert 8, capacity 1.0, pair rule", BIG, "v5p-256",
                          ["--gin.model_config.capacity_rule='pair'"]),
    # ... and with the worst-case dispatch buffers of before the ragged dispatch.
    "236b_4k_worst_case": ("236B 4K, fsdp x expert 8, capacity 1.0, worst-case buffers", BIG,
                           "v5p-256", ["--gin.model_config.dispatch_headroom=None"]),
}


def run_row(name: str) -> dict:
  import gin
  from coder_jax import main as entry
  what, gin_file, topology, extra = ROWS[name]
  flags = [f"--gin_file={gin_file}", *UNUSED, *extra, f"--compile_topology={topology}"]
  print(f"\n== {name}: {what} on {topology}\n   {' '.join(flags)}", flush=True)
  gin.clear_config()
  t0 = time.perf_counter()
  try:
    report = entry.main(flags)
  finally:
    gin.clear_config()
  report = {k: v for k, v in report.items() if not isinstance(v, (bytes, bytearray))}
  return {"name": name, "what": what, "wall_s": time.perf_counter() - t0, **report}


def _gib(n) -> str:
  return "—" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict]) -> str:
  head = ("| run | topology (chips) | mesh (data/fsdp/expert/tensor) | params + opt state | "
          "arguments | temporaries | outputs | total / HBM | fits (margin) | XLA TFLOP / GiB | "
          "roofline ms | MFU bound | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "mesh" not in r:      # a search that found no slice that fits
      lines.append(f"| {r['what']} | none up to {r['search'][-1]['topology']} | " + "— | " * 10
                   + "— |")
      continue
    m = r["mesh"]
    mesh = "/".join(str(m.get(a, 1)) for a in ("data", "fsdp", "expert", "tensor"))
    state = _gib(r["params_bytes"] + r["opt_state_bytes"])
    fits = ("yes" if r["fits"] else "**no**") + f" ({_gib(r['margin_bytes'])})"
    if not r.get("compiled"):
      lines.append(f"| {r['what']} | {r['topology']} ({r['chips']}) | {mesh} | {state} | — | — | "
                   f"— | {_gib(r['total_bytes'])} / {_gib(r['hbm_bytes'])} | {fits} | "
                   "not compiled | — | — | — |")
      continue
    outs = r["output_bytes"] - r["alias_bytes"]
    mfu = f"{100 * r['mfu_bound']:.0f}%" if r.get("mfu_bound") else "—"
    lines.append(
        f"| {r['what']} | {r['topology']} ({r['chips']}) | {mesh} | {state} | "
        f"{_gib(r['argument_bytes'])} | {_gib(r['temp_bytes'])} | {_gib(outs)} | "
        f"{_gib(r['total_bytes'])} / {_gib(r['hbm_bytes'])} | {fits} | "
        f"{r['xla_flops'] / 1e12:.1f} / {r['xla_bytes'] / 2**30:.0f} | "
        f"{1e3 * r['roofline_s']:.0f} | {mfu} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def load() -> list[dict]:
  if not os.path.exists(OUT):
    return []
  with open(OUT) as f:
    return json.load(f)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
  ap.add_argument("--table", action="store_true", help="print the saved rows' table and exit")
  args = ap.parse_args(argv)
  if args.table:
    saved = {r["name"]: r for r in load()}
    print(table([saved[n] for n in ROWS if n in saved]))
    return 0
  os.chdir(ROOT)
  sys.path.insert(0, ROOT)
  import jax
  print(f"jax {jax.__version__}; compiled on {os.cpu_count()} CPU cores", flush=True)
  for name in args.only.split(","):
    row = run_row(name)
    saved = [r for r in load() if r["name"] != name] + [row]
    with open(OUT, "w") as f:
      json.dump(saved, f, indent=1, default=str)
  saved = {r["name"]: r for r in load()}
  print(table([saved[n] for n in ROWS if n in saved]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
