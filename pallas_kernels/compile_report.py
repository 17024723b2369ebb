"""Compile the Pallas Triton kernels to H100 (sm_90a) cubins on any machine; report resources.

    python -m pallas_kernels.compile_report                   # the benchmark shapes
    python -m pallas_kernels.compile_report --shapes all      # + Lite, 236B and ragged shapes
    python -m pallas_kernels.compile_report --shapes ragged --ops gmm

No GPU is needed. Each public op is lowered for `cuda`; jaxlib 0.10.2's Pallas puts every
kernel's Triton IR (MLIR bytecode) in the `ir` field of a `__gpu$xla.gpu.triton` custom call's
backend config, beside its num_warps / num_stages. Triton's own compiler takes that IR to PTX
for sm_90a, and the ptxas shipped in the triton wheel builds the cubin and reports registers and
spill bytes. Shared memory is Triton's figure (dynamic shared memory, which ptxas does not see).
Blocks / SM: resident blocks per H100 SM from registers, shared memory and warps.

Needs the verified pairing below: triton's MLIR must read jaxlib's bytecode (triton 3.5-3.7 and
3.9 do not read jaxlib 0.10.2's), and later jaxlibs compile the kernels while lowering and keep
no Triton IR in the graph. TPU figures await an ahead-of-time TPU compile (issue 13).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

VERIFIED_PAIRING = {"jax": "0.10.2", "triton": "3.8.0"}   # jax and jaxlib alike
TRITON_CALL = "__gpu$xla.gpu.triton"

# H100 (sm_90) per-SM limits, as in NVIDIA's occupancy calculator.
SMEM_PER_BLOCK_MAX = 227 * 1024     # opt-in maximum for one block
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024      # the runtime's share of each resident block
REGS_PER_SM = 64 * 1024
REG_ALLOC_UNIT = 256                # registers are granted per warp in 256s
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def triton_dir() -> str:
  """Where triton is installed: outside site-packages (scripts/setup.sh puts it in
  .venv/triton), because torch imports any triton it finds and triton's native library crashes
  a process that has loaded TensorFlow's. CODER_JAX_TRITON_DIR overrides it."""
  return os.environ.get("CODER_JAX_TRITON_DIR") or os.path.join(sys.prefix, "triton")


def triton_version() -> str | None:
  """The version installed in triton_dir(), read from its metadata (nothing is imported)."""
  found = glob.glob(os.path.join(triton_dir(), "triton-*.dist-info"))
  return os.path.basename(found[0])[len("triton-"):-len(".dist-info")] if found else None


def pairing_problem() -> str | None:
  """Why the compile cannot run here (a sentence naming the pairing), or None when it can."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  want = VERIFIED_PAIRING
  need = f"jax / jaxlib {want['jax']} with triton=={want['triton']} (the verified pairing)"
  found = {jax.__version__, jaxlib.__version__}
  if found != {want["jax"]}:
    return (f"the H100 compile check needs {need}; found jax {jax.__version__} / jaxlib "
            f"{jaxlib.__version__}, whose Pallas lowering does not hand over Triton IR that "
            f"triton {want['triton']} is known to read")
  version = triton_version()
  if version is None:
    return (f"the H100 compile check needs {need}; triton is not installed in {triton_dir()} "
            "(scripts/setup.sh requirements-test.txt installs it there)")
  if version != want["triton"]:
    return (f"the H100 compile check needs {need}; found triton {version}, which "
            f"does not read jaxlib {want['jax']}'s Triton IR")
  return None


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One kernel as the lowering hands it to XLA."""
  name: str
  ir: bytes            # Triton IR, MLIR bytecode
  num_warps: int
  num_stages: int


def triton_kernels(fn: Callable, *args) -> list[TritonKernel]:
  """The Triton kernels in `jax.jit(fn)` lowered for cuda, in graph order, each once."""
  module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
  from jaxlib.mlir import ir  # pylint: disable=import-outside-toplevel
  found, seen = [], set()

  def visit(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if (child.name == "stablehlo.custom_call"
              and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
            cfg = child.attributes["mhlo.backend_config"]
            kernel = TritonKernel(
                name=ir.StringAttr(cfg["name"]).value,
                ir=ir.StringAttr(cfg["ir"]).value_bytes,
                num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                num_stages=ir.IntegerAttr(cfg["num_stages"]).value)
            if kernel not in seen:
              seen.add(kernel)
              found.append(kernel)
          visit(child)

  visit(module.operation)
  return found


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one compiled kernel needs of an H100 SM."""
  name: str
  num_warps: int
  num_stages: int
  shared_bytes: int
  registers: int
  spill_stores: int
  spill_loads: int

  @property
  def spill_bytes(self) -> int:
    return self.spill_stores + self.spill_loads

  @property
  def fits(self) -> bool:
    return self.shared_bytes <= SMEM_PER_BLOCK_MAX

  @property
  def blocks_per_sm(self) -> int:
    return blocks_per_sm(self.registers, self.shared_bytes, self.num_warps)

  @property
  def ok(self) -> bool:
    """Launchable on an H100 and spill-free."""
    return self.fits and self.spill_bytes == 0


def blocks_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
  """Resident blocks per H100 SM: the least of the register, shared-memory and warp limits."""
  if shared_bytes > SMEM_PER_BLOCK_MAX:
    return 0
  regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
  by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
  by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
  return min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
  """(registers, spill store bytes, spill load bytes) from `ptxas -v` output for one kernel."""
  regs = re.search(r"Used (\d+) registers", log)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  if regs is None or spills is None:
    raise ValueError(f"no register / spill figures in the ptxas log:\n{log}")
  return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_kernel(kernel: TritonKernel) -> Resources:
  """Compile one kernel to an sm_90a cubin with triton and ptxas (in a process of its own that
  imports only triton: see _triton_worker.py); its resources."""
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = triton_dir()
  with tempfile.TemporaryDirectory(prefix="compile_report_") as tmp:
    path = os.path.join(tmp, kernel.name + ".mlirbc")
    with open(path, "wb") as f:
      f.write(kernel.ir)
    run = subprocess.run([sys.executable, worker, path, str(kernel.num_warps),
                          str(kernel.num_stages)], capture_output=True, text=True, env=env)
  if run.returncode:
    lines = (run.stderr.strip() or run.stdout.strip()).splitlines() or [""]
    raise RuntimeError(f"{kernel.name}: triton did not compile it: {lines[-1]}")
  out = json.loads(run.stdout.strip().splitlines()[-1])
  regs, stores, loads = parse_ptxas_log(out["ptxas_log"])
  return Resources(kernel.name, kernel.num_warps, kernel.num_stages, out["shared"], regs,
                   stores, loads)


@dataclasses.dataclass(frozen=True)
class Case:
  """A public op at one shape and setting, lowered whole (with its backward kernels, if any)."""
  label: str
  fn: Callable
  args: tuple


def attention_case(b, t, h, dqk, dv, *, segments: bool, grad: bool = True, block_sizes=None,
                   dtype=jnp.bfloat16, keys: int | None = None) -> Case:
  """keys: S > t keys, the queries being their last t (the context-parallel path)."""
  from pallas_kernels.attention import mla_attention  # pylint: disable=import-outside-toplevel
  s = keys or t
  q = jax.ShapeDtypeStruct((b, t, h, dqk), dtype)
  k = jax.ShapeDtypeStruct((b, s, h, dqk), dtype)
  v = jax.ShapeDtypeStruct((b, s, h, dv), dtype)
  seg = jax.ShapeDtypeStruct((b, s), jnp.int32)

  def fwd(q, k, v, seg):
    return mla_attention(q, k, v, segment_ids=seg if segments else None, causal=True,
                         backend="triton", block_sizes=block_sizes)

  fn = fwd
  if grad:
    fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  label = (f"attention B{b} T{t}{f' S{s}' if keys else ''} H{h} {dqk}/{dv} "
           f"causal{' +segments' if segments else ''} {jnp.dtype(dtype).name}")
  return Case(label, fn, (q, k, v, seg))


def gmm_case(m, k, n, g, *, grad: bool = True, tiling=None, dtype=jnp.bfloat16) -> Case:
  from pallas_kernels.grouped_matmul import grouped_matmul  # pylint: disable=import-outside-toplevel
  args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
          jax.ShapeDtypeStruct((g,), jnp.int32))

  def fwd(lhs, rhs, sizes):
    return grouped_matmul(lhs, rhs, sizes, backend="triton", tiling=tiling)

  fn = fwd
  if grad:
    fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1))
  return Case(f"gmm M{m} K{k} N{n} G{g} {jnp.dtype(dtype).name}", fn, args)


def decode_case(b, h, r, dr, s, *, dtype=jnp.bfloat16, **settings) -> Case:
  from pallas_kernels.decode_attention import latent_decode_attention  # pylint: disable=import-outside-toplevel
  args = (jax.ShapeDtypeStruct((b, h, r), dtype), jax.ShapeDtypeStruct((b, h, dr), dtype),
          jax.ShapeDtypeStruct((b, s, r), dtype), jax.ShapeDtypeStruct((b, s, dr), dtype),
          jax.ShapeDtypeStruct((b,), jnp.int32))

  def fn(*a):
    return latent_decode_attention(*a, sm_scale=0.1, backend="triton", **settings)

  return Case(f"decode B{b} H{h} R{r} Dr{dr} S{s} {jnp.dtype(dtype).name}", fn, args)


# Shapes by op. bench: benchmarks/kernels.py's (decode: a 64-row batch at a 4K cache). Lite and
# 236B: the models' head dims with packed documents (segments), their expert matmuls up
# (hidden -> moe ff; Lite's is bench's) and down, their decode head counts at a 32K cache.
# ragged: every dim off the tile (attention also with queries the last of longer keys).
def preset(name: str) -> dict[str, list[Case]]:
  if name == "bench":
    return {"attention": [attention_case(2, 4096, 16, 192, 128, segments=False)],
            "gmm": [gmm_case(49152, 2048, 1408, 64)],
            "decode": [decode_case(64, 16, 512, 64, 4096)]}
  if name == "lite":
    return {"attention": [attention_case(1, 4096, 16, 192, 128, segments=True)],
            "gmm": [gmm_case(49152, 1408, 2048, 64)],
            "decode": [decode_case(8, 16, 512, 64, 32768)]}
  if name == "236b":
    return {"attention": [attention_case(1, 4096, 128, 192, 128, segments=True)],
            "gmm": [gmm_case(49152, 5120, 1536, 160), gmm_case(49152, 1536, 5120, 160)],
            "decode": [decode_case(8, 128, 512, 64, 32768)]}
  if name == "ragged":
    return {"attention": [attention_case(2, 1000, 3, 192, 128, segments=True),
                          attention_case(2, 1000, 3, 192, 128, segments=True, keys=1400)],
            "gmm": [gmm_case(1000, 1400, 1000, 5), gmm_case(200, 96, 72, 5, dtype=jnp.float32)],
            "decode": [decode_case(3, 5, 72, 40, 1000)]}
  raise ValueError(f"unknown shapes {name!r}; one of {PRESETS}")


PRESETS = ("bench", "lite", "236b", "ragged")
OPS = ("attention", "gmm", "decode")


def compile_case(case: Case, cache: dict | None = None) -> list[Resources]:
  """Resources of every Triton kernel in the case; `cache` (IR digest -> Resources) skips
  kernels compiled before."""
  out = []
  for kernel in triton_kernels(case.fn, *case.args):
    key = hashlib.sha256(kernel.ir + f"{kernel.num_warps},{kernel.num_stages}".encode()).digest()
    res = None if cache is None else cache.get(key)
    if res is None:
      res = compile_kernel(kernel)
      if cache is not None:
        cache[key] = res
    out.append(res)
  return out


def table(rows: Sequence[tuple[str, Resources]]) -> str:
  """Markdown table of (case label, resources) rows."""
  lines = ["| case | kernel | warps / stages | shared memory | registers | spills (stores / "
           "loads) | blocks / SM |", "|---|---|---|---|---|---|---|"]
  for label, r in rows:
    smem = f"{r.shared_bytes:,} B" + ("" if r.fits else " **over 227 KiB**")
    spills = f"{r.spill_stores} / {r.spill_loads} B"
    lines.append(f"| {label} | {r.name} | {r.num_warps} / {r.num_stages} | {smem} | "
                 f"{r.registers} | {spills if not r.spill_bytes else f'**{spills}**'} | "
                 f"{r.blocks_per_sm} ({r.blocks_per_sm * r.num_warps * 100 // MAX_WARPS_PER_SM}"
                 f"% warps) |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", nargs="+", default=["bench"], choices=PRESETS + ("all",))
  ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
  args = ap.parse_args(argv)
  problem = pairing_problem()
  if problem:
    print(f"compile_report: {problem}")
    return 2
  import jaxlib  # pylint: disable=import-outside-toplevel
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, triton {triton_version()}; "
        "target sm_90a (H100), default block sizes\n")
  names = PRESETS if "all" in args.shapes else args.shapes
  rows, cache, failed = [], {}, 0
  for name in names:
    for op, cases in preset(name).items():
      if op not in args.ops:
        continue
      for case in cases:
        try:
          rows += [(f"{name}: {case.label}", r) for r in compile_case(case, cache)]
        except Exception as e:  # report, go on with the next case
          failed += 1
          first = (str(e).strip().splitlines() or [""])[0]
          print(f"- {name}: {case.label}: failed: {type(e).__name__}: {first[:300]}")
  print(table(rows))
  bad = [f"{label} {r.name}" for label, r in rows if not r.ok]
  if bad:
    print("\nspilling or over the shared-memory limit: " + "; ".join(bad))
  return 1 if bad or failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
