"""Grouped-matmul kernels (Pallas Triton and Mosaic, in interpret mode) against the XLA reference,
the XLA backend against a float64 numpy oracle, input validation, the work plan, and the real
GPU / TPU lowerings (cross-lowered on CPU)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul, reference_grouped_matmul
from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.reference import reference_tgmm

KERNEL_BACKENDS = ["triton", "tpu"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small tiles so every case spans several row tiles, K steps and N tiles (Triton needs powers of
# two >= 16; interpret-mode Mosaic takes any multiple of 8).
TILING = {"triton": (32, 16, 16), "tpu": (32, 32, 24)}


def _sizes_first_last_empty(rng, m, g):
  inner = rng.multinomial(m - 9, np.ones(g - 2) / (g - 2))
  return [0, *inner, 0]


def _sizes_one_group(rng, m, g):
  sizes = [0] * g
  sizes[g // 2] = m
  return sizes


def _sizes_skewed(rng, m, g):
  small = [1, 0, 2, 3][: g - 2]
  return [small[0], m - 11 - sum(small), *small[1:], 5]


def _sizes_single(rng, m, g):
  return [m - 7]


def _sizes_all_empty(rng, m, g):
  return [0] * g


def _sizes_many_small(rng, m, g):
  sizes = rng.multinomial(m, rng.dirichlet(np.ones(g) * 0.5))
  sizes[[1, 4]] = 0  # empty groups in the middle; the rows go past the end (sum < M)
  return list(sizes)


# name: (seed, G, group-size pattern, dtype, preferred_element_type, use small tiles)
CASES = {
    "first_last_empty_f32": (1, 5, _sizes_first_last_empty, jnp.float32, None, True),
    "one_group_bf16_out_f32": (2, 4, _sizes_one_group, jnp.bfloat16, jnp.float32, True),
    "skewed_bf16": (3, 6, _sizes_skewed, jnp.bfloat16, None, True),
    "single_group_f32": (4, 1, _sizes_single, jnp.float32, None, True),
    "all_empty_f32": (5, 3, _sizes_all_empty, jnp.float32, None, True),
    "many_small_f32_default_tiles": (6, 8, _sizes_many_small, jnp.float32, None, False),
}


def _not_multiple(rng, lo, hi, of):
  while True:
    x = int(rng.integers(lo, hi))
    if x % of:
      return x


def _make_case(name, backend):
  seed, g, sizes_fn, dtype, out_dtype, small_tiles = CASES[name]
  rng = np.random.default_rng(seed)
  tm, tk, tn = TILING[backend]
  m = _not_multiple(rng, 70, 120, tm)
  k = _not_multiple(rng, 20, 64, tk)
  n = _not_multiple(rng, 20, 64, tn)
  sizes = np.asarray(sizes_fn(rng, m, g), np.int32)
  assert sizes.shape == (g,) and sizes.min() >= 0 and sizes.sum() <= m
  # Fresh, nonzero inputs every case; bf16 inputs are rounded once and the reference reuses them.
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
  dout = jnp.asarray(rng.standard_normal((m, n)), out_dtype or dtype)
  tiling = TILING[backend] if small_tiles else None
  return lhs, rhs, jnp.asarray(sizes), dout, out_dtype, tiling


# Interpret-mode kernels are large HLO programs; skipping LLVM's heavy passes halves their compile
# time, which dominates this file's run time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fwd_and_vjp(gmm_fn):
  def run(lhs, rhs, group_sizes, dout):
    out, vjp = jax.vjp(lambda a, b: gmm_fn(a, b, group_sizes), lhs, rhs)
    return (out, *vjp(dout))
  return jax.jit(run, compiler_options=_FAST_COMPILE)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  if scale == 0:
    return np.abs(got).max()  # an all-zero answer must be matched exactly
  return np.abs(got - want).max() / scale


def _check_against_reference(backend, case, *, interpret):
  lhs, rhs, sizes, dout, out_dtype, tiling = _make_case(case, backend)
  if backend == "tpu" and not interpret:
    tiling = None  # the interpret-mode tiles are not Mosaic-legal lane widths
  kernel = _fwd_and_vjp(lambda a, b, gs: grouped_matmul(
      a, b, gs, backend=backend, interpret=interpret, tiling=tiling,
      preferred_element_type=out_dtype))
  reference = _fwd_and_vjp(reference_grouped_matmul)
  got = kernel(lhs, rhs, sizes, dout)
  f32 = lambda x: x.astype(jnp.float32)
  want = reference(f32(lhs), f32(rhs), sizes, f32(dout))

  assert got[0].dtype == jnp.dtype(out_dtype or lhs.dtype)
  assert got[1].dtype == lhs.dtype and got[2].dtype == rhs.dtype
  tol = TOL[lhs.dtype.type]
  for what, a, b in zip(("out", "dlhs", "drhs"), got, want):
    assert a.shape == b.shape, what
    assert np.isfinite(np.asarray(a, np.float32)).all(), what
    assert _rel_err(a, b) <= tol, (what, _rel_err(a, b))
  total = int(sizes.sum())
  # Rows past the groups and empty groups' weight gradients are exact zeros, not just small.
  assert not np.asarray(got[0][total:], np.float32).any()
  assert not np.asarray(got[1][total:], np.float32).any()
  assert not np.asarray(got[2][np.asarray(sizes) == 0], np.float32).any()


_DEVICE_PLATFORM = {"triton": "gpu", "tpu": "tpu"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, case):
  """Interpreted on CPU; compiled for the device where it is the default backend (run the file
  with JAX_PLATFORMS=cuda on a GPU)."""
  native = jax.default_backend() == _DEVICE_PLATFORM[backend]
  _check_against_reference(backend, case, interpret=not native)


def _numpy_oracle(lhs, rhs, sizes, dout):
  lhs, rhs, dout = (np.asarray(x, np.float64) for x in (lhs, rhs, dout))
  out, dlhs, drhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
  start = 0
  for g, size in enumerate(np.asarray(sizes)):
    rows = slice(start, start + size)
    out[rows] = lhs[rows] @ rhs[g]
    dlhs[rows] = dout[rows] @ rhs[g].T
    drhs[g] = lhs[rows].T @ dout[rows]
    start += size
  return out, dlhs, drhs


@pytest.mark.parametrize("case", ["first_last_empty_f32", "single_group_f32", "all_empty_f32"])
def test_xla_backend_matches_float64_oracle(case):
  lhs, rhs, sizes, dout, _, _ = _make_case(case, "triton")
  got = _fwd_and_vjp(lambda a, b, gs: grouped_matmul(a, b, gs, backend="xla"))(
      lhs, rhs, sizes, dout)
  want = _numpy_oracle(lhs, rhs, sizes, dout)
  for what, a, b in zip(("out", "dlhs", "drhs"), got, want):
    assert _rel_err(a, b) <= 1e-5, (what, _rel_err(a, b))
  assert not np.asarray(got[0][int(sizes.sum()):]).any()
  assert _rel_err(reference_tgmm(lhs, dout, sizes), want[2]) <= 1e-5


def test_default_backend_on_cpu_is_xla(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  lhs, rhs, sizes, _, _, _ = _make_case("skewed_bf16", "triton")
  np.testing.assert_array_equal(
      np.asarray(grouped_matmul(lhs, rhs, sizes), np.float32),
      np.asarray(reference_grouped_matmul(lhs, rhs, sizes), np.float32))
  with pytest.raises(ValueError, match=r"interpret=True needs a kernel backend"):
    grouped_matmul(lhs, rhs, sizes, interpret=True)


@pytest.mark.parametrize("m,tm,sizes", [
    (100, 32, [0, 30, 7, 40, 0]), (64, 16, [64]), (50, 16, [0, 0, 0]), (7, 8, [3, 0, 4]),
    (97, 8, [5, 0, 11, 40, 1, 0, 17, 3]),
])
@pytest.mark.parametrize("for_tgmm", [False, True])
def test_work_plan_covers_every_row_once(m, tm, sizes, for_tgmm):
  sizes = np.asarray(sizes, np.int32)
  make_plan = jax.jit(metadata.make_work_plan, static_argnums=(1, 2), static_argnames="for_tgmm")
  plan = jax.tree.map(np.asarray, make_plan(jnp.asarray(sizes), m, tm, for_tgmm=for_tgmm))
  assert plan.tile_ids_I.shape == (metadata.num_items_bound(m, tm, len(sizes)),)
  assert (np.diff(plan.tile_ids_I) >= 0).all() and plan.tile_ids_I.max() < -(-m // tm)
  written = np.zeros(m, int)
  for g, t, s, e in zip(plan.group_ids_I, plan.tile_ids_I, plan.row_starts_I, plan.row_ends_I):
    rows = np.arange(t * tm, min(t * tm + tm, m))
    written[rows[(rows >= s) & (rows < e)]] += 1
  ends = np.cumsum(sizes)
  if for_tgmm:
    assert (written[: ends[-1]] == 1).all() and not written[ends[-1]:].any()
    # Every group (empty ones too) opens and closes exactly one run.
    for field in (plan.first_of_group_I, plan.last_of_group_I):
      assert sorted(plan.group_ids_I[field == 1].tolist()) == list(range(len(sizes)))
  else:
    assert (written == 1).all()  # the virtual group writes the rows past the groups
    first_visits = plan.tile_ids_I[plan.first_of_tile_I == 1]
    assert first_visits.tolist() == list(range(-(-m // tm)))


def _args(m=16, k=8, n=4, g=2, gs_dtype=jnp.int32):
  return (jnp.ones((m, k)), jnp.ones((g, k, n)), jnp.full((g,), 2, gs_dtype))


@pytest.mark.parametrize("args,kwargs,message", [
    ((jnp.ones((2, 16, 8)), *_args()[1:]), {}, r"lhs must be rank 2 \[M, K\]"),
    ((_args()[0], jnp.ones((8, 4)), _args()[2]), {}, r"rhs must be rank 3 \[G, K, N\]"),
    ((*_args()[:2], jnp.ones((2, 1), jnp.int32)), {}, r"group_sizes must be rank 1"),
    ((jnp.ones((16, 9)), *_args()[1:]), {}, r"K mismatch: lhs .*K=9.* rhs .*K=8"),
    ((*_args()[:2], jnp.ones((3,), jnp.int32)), {}, r"group_sizes has 3 entries but rhs has G=2"),
    (_args(gs_dtype=jnp.float32), {}, r"group_sizes must have an integer dtype, got float32"),
    ((jnp.ones((16, 8), jnp.int32), *_args()[1:]), {}, r"lhs must have a floating dtype"),
    (_args(), {"backend": "cuda"}, r"unknown backend 'cuda'"),
    (_args(), {"interpret": True, "backend": "xla"}, r"interpret=True needs a kernel backend"),
    (_args(), {"tiling": (32, 32)}, r"tiling must be a \(tm, tk, tn\) tuple of positive ints"),
    (_args(), {"tiling": (32, 0, 32)}, r"tiling must be a \(tm, tk, tn\) tuple"),
    (_args(), {"backend": "triton", "tiling": (32, 24, 32)},
     r"triton tiles must be powers of two >= 16"),
    (_args(), {"backend": "triton", "tiling": (8, 16, 16)},
     r"triton tiles must be powers of two >= 16"),
    (_args(), {"backend": "tpu", "tiling": (12, 8, 4)}, r"tpu tm must be a multiple of 8"),
    ((jnp.ones((512, 512)), jnp.ones((2, 512, 256)), jnp.full((2,), 2, jnp.int32)),
     {"backend": "tpu", "tiling": (128, 64, 128)},
     r"tpu tk and tn must be multiples of 128 or cover the whole dim"),
    (_args(), {"preferred_element_type": jnp.int32},
     r"preferred_element_type must be a floating dtype"),
])
def test_validation_errors(args, kwargs, message):
  with pytest.raises(ValueError, match="grouped_matmul: " + message):
    grouped_matmul(*args, **kwargs)


# The Triton call target depends on the jaxlib version ("__gpu$xla.gpu.triton" up to 0.10.2,
# "triton_kernel_call_ffi" after); both name Triton.
_KERNEL_CALL = {"cuda": re.compile(r"custom_call @([\w$.]*triton[\w$.]*)"),
                "tpu": re.compile(r"custom_call @(tpu_custom_call)")}


@pytest.mark.parametrize("m,k,n,g,dtype", [
    (49152, 2048, 1408, 64, jnp.bfloat16),  # the benchmark shape
    (200, 96, 72, 5, jnp.float32),          # ragged: every dim has a tail
])
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
def test_lowers_for_device(backend, platform, m, k, n, g, dtype, grad):
  args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
          jax.ShapeDtypeStruct((g,), jnp.int32))
  gmm = lambda a, b, gs: grouped_matmul(a, b, gs, backend=backend)
  if grad:
    f = jax.grad(lambda a, b, gs: gmm(a, b, gs).astype(jnp.float32).sum(), argnums=(0, 1))
  else:
    f = gmm
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  calls = _KERNEL_CALL[platform].findall(text)
  # Forward: the gmm kernel; grad: at least the dlhs gmm and the tgmm kernels.
  assert len(calls) >= (2 if grad else 1), calls
  # No fallback: every matmul is inside a kernel (the serialized kernels are skipped here).
  outside = "\n".join(line for line in text.splitlines() if "custom_call" not in line)
  assert "dot_general" not in outside and "ragged_dot" not in outside


@pytest.mark.parametrize("m,g", [(6, 64), (48, 64), (8, 160)])
def test_work_plan_of_a_decode_step_visits_only_routed_experts(m, g):
  """A decode step's few token copies (m rows, e.g. one row x top-6) over many experts: gmm's
  items visit only the groups that hold rows, and the inactive items past them repeat the last
  active item's (group, tile), so no grid step moves to another expert's weight block: the
  kernels read the routed experts' weights only, and empty groups cost nothing."""
  rng = np.random.default_rng(m)
  sizes = np.bincount(rng.choice(g, m), minlength=g)
  plan = metadata.make_work_plan(jnp.asarray(sizes, jnp.int32), m, 128, for_tgmm=False)
  routed = set(np.nonzero(sizes)[0].tolist())
  groups = np.asarray(plan.group_ids_I)
  active = np.asarray(plan.row_ends_I) > np.asarray(plan.row_starts_I)
  assert set(groups.tolist()) == routed
  assert active.sum() == len(routed)                       # one tile (m <= 128) per routed group
  assert (groups[~active] == groups[active][-1]).all()     # inactive: no new weight block
  assert (np.asarray(plan.tile_ids_I) == 0).all()
