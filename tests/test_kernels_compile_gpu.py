"""Every Pallas Triton kernel compiles to an H100 (sm_90a) cubin on this CPU-only machine at its
default block sizes, with 0 spill bytes and shared memory under the per-block limit
(pallas_kernels/compile_report.py: Triton's compiler and the ptxas in the triton wheel).

The compile needs the verified pairing jaxlib 0.10.2 + triton==3.8.0 (requirements-test.txt);
with other versions those tests skip and say so. The parsing and occupancy tests always run.
"""

import importlib
import importlib.util
import os

import jax.numpy as jnp
import pytest

from pallas_kernels import compile_report as cr

PROBLEM = cr.pairing_problem()
needs_pairing = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

KERNELS = {"attention": {"mla_attention_fwd", "mla_attention_dkdv", "mla_attention_dq"},
           "gmm": {"gmm", "gmm_dlhs", "tgmm"},
           "decode": {"mla_decode_attention"}}

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'gmm' for 'sm_90a'
ptxas info    : Function properties for gmm
    72 bytes stack frame, 100 bytes spill stores, 92 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size
"""


def test_parse_ptxas_log():
  assert cr.parse_ptxas_log(PTXAS_LOG) == (255, 100, 92)
  with pytest.raises(ValueError, match="no register / spill figures"):
    cr.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


@pytest.mark.parametrize("regs, smem, warps, want", [
    (255, 132_096, 8, 1),   # 255 regs -> 8,192 a warp: 8 warps fit the register file
    (128, 0, 4, 4),         # 4,096 a warp -> 16 warps -> 4 blocks (warp limit also 16)
    (64, 0, 4, 8),          # 2,048 a warp -> 32 warps -> 8 blocks
    (32, 0, 1, 32),         # capped by the 32-blocks-per-SM limit
    (40, 100_000, 4, 2),    # shared memory: 233,472 // 101,024 = 2
    (40, 227 * 1024 + 1, 4, 0),   # over the per-block maximum: cannot launch
])
def test_blocks_per_sm(regs, smem, warps, want):
  """Against the H100 limits by hand: 64K registers granted per warp in 256s, 228 KiB shared
  memory with 1 KiB reserved per block, 64 warps and 32 blocks an SM."""
  assert cr.blocks_per_sm(regs, smem, warps) == want


@pytest.mark.parametrize("module", ["jaxlib", "triton"])
def test_pairing_problem_names_the_pairing(monkeypatch, module):
  if module == "triton":
    monkeypatch.setattr(cr, "triton_version", lambda: "0.0.1")
  else:
    monkeypatch.setattr(importlib.import_module(module), "__version__", "0.0.1")
  msg = cr.pairing_problem()
  assert "jax / jaxlib 0.10.2 with triton==3.8.0" in msg and "0.0.1" in msg


def test_triton_stays_off_the_import_path():
  """torch imports any triton it can find, and triton's native library crashes a process that
  has loaded TensorFlow: the project's triton lives in its own directory."""
  import importlib.util
  assert importlib.util.find_spec("triton") is None


def compile_op(preset, op):
  rows = []
  for case in cr.preset(preset)[op]:
    rows += [(case.label, r) for r in cr.compile_case(case)]
  return rows


def assert_clean(rows, op):
  assert {r.name for _, r in rows} == KERNELS[op]
  for label, r in rows:
    assert r.spill_bytes == 0, (label, r)
    assert r.shared_bytes <= cr.SMEM_PER_BLOCK_MAX, (label, r)
    assert r.blocks_per_sm >= 1, (label, r)


@needs_pairing
@pytest.mark.parametrize("op", cr.OPS)
def test_benchmark_shapes_compile_without_spills(op):
  """Attention B2 T4096 H16 192/128 causal, gmm M49152 K2048 N1408 G64 (forward and both
  backward kernels), decode B64 H16 R512 S4096; bf16, default blocks."""
  assert_clean(compile_op("bench", op), op)


@needs_pairing
@pytest.mark.parametrize("op", cr.OPS)
def test_ragged_shapes_compile_without_spills(op):
  """Every dim off the tile: the masked tails (and segment ids for attention) are in the code."""
  assert_clean(compile_op("ragged", op), op)


@needs_pairing
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["lite", "236b"])
@pytest.mark.parametrize("op", cr.OPS)
def test_model_shapes_compile_without_spills(preset, op):
  """The models' head dims with packed documents, both expert matmuls, their decode heads."""
  assert_clean(compile_op(preset, op), op)


@needs_pairing
def test_gmm_loop_bounds_are_one_type():
  """The gmm loop's bounds were an i32 and an i1 (a select of weak Python ints lowers to the
  predicate's type), which Triton's verifier rejects: the kernel must parse and compile."""
  case = cr.gmm_case(64, 32, 32, 2, grad=False, dtype=jnp.bfloat16)
  [kernel] = cr.triton_kernels(case.fn, *case.args)
  assert kernel.name == "gmm"
  assert cr.compile_kernel(kernel).spill_bytes == 0


def _benchmarks_kernels():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "kernels.py")
  spec = importlib.util.spec_from_file_location("benchmarks_kernels", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@needs_pairing
@pytest.mark.slow
def test_tune_candidates_compile_without_spills():
  """benchmarks/kernels.py --tune's Triton candidates stay spill-free at the tuning shapes, so
  a GPU that cannot run this check still times only those."""
  bk = _benchmarks_kernels()
  cache = {}
  for name, cases in bk.triton_compile_cases(bk.FULL).items():
    for cand, case in cases:
      for r in cr.compile_case(case, cache):
        assert r.ok, (name, cand, r)


def test_tune_defaults_come_first():
  """The first candidate of each Triton list is today's default."""
  from pallas_kernels.attention import DEFAULT_BLOCKS
  from pallas_kernels.grouped_matmul import triton as gmm_triton
  bs = DEFAULT_BLOCKS["triton"]
  tune = _benchmarks_kernels().TUNE["triton"]
  assert tune["attn_fwd"][0] == (bs.block_q, bs.block_k, bs.num_warps, bs.num_stages)
  assert tune["attn_bwd"][0] == (bs.bwd_block_q, bs.bwd_block_k, bs.bwd_num_warps,
                                 bs.bwd_num_stages)
  assert tune["gmm"][0] == gmm_triton.default_tiling(49152, 2048, 1408, jnp.bfloat16)


@needs_pairing
def test_tune_drops_spilling_candidates(monkeypatch, capsys):
  """--tune's check drops a backward candidate that spills (over 4 warps, 64-key blocks' dK and
  dV accumulators alone take 160 registers a thread) and keeps the default."""
  bk = _benchmarks_kernels()
  tune = {"attn_fwd": [], "attn_bwd": [bk.TUNE["triton"]["attn_bwd"][0], (64, 64, 4, 2)],
          "gmm": []}
  monkeypatch.setitem(bk.TUNE, "triton", tune)
  kept = bk.spill_free_candidates(bk.FULL)
  assert kept == {"attn_fwd": [], "attn_bwd": [tune["attn_bwd"][0]], "gmm": []}
  rows = [line for line in capsys.readouterr().out.splitlines() if "(64, 64, 4, 2)" in line]
  assert rows and all(line.endswith("| no |") for line in rows)
