"""grouped_matmul: input validation, backend choice, tile choice and dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from pallas_kernels.backends import resolve_backend
from pallas_kernels.grouped_matmul import tpu, triton
from pallas_kernels.grouped_matmul.reference import reference_grouped_matmul
from pallas_kernels.grouped_matmul.vjp import KernelConfig, gmm_with_vjp



def _fail(msg: str):
  raise ValueError(f"grouped_matmul: {msg}")


def _check_inputs(lhs, rhs, group_sizes, preferred_element_type):
  if lhs.ndim != 2:
    _fail(f"lhs must be rank 2 [M, K], got shape {lhs.shape}")
  if rhs.ndim != 3:
    _fail(f"rhs must be rank 3 [G, K, N], got shape {rhs.shape}")
  if group_sizes.ndim != 1:
    _fail(f"group_sizes must be rank 1 [G], got shape {group_sizes.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    _fail(f"K mismatch: lhs is {lhs.shape} (K={lhs.shape[1]}) but rhs is {rhs.shape} "
          f"(K={rhs.shape[1]})")
  if group_sizes.shape[0] != rhs.shape[0]:
    _fail(f"group_sizes has {group_sizes.shape[0]} entries but rhs has G={rhs.shape[0]} groups")
  if rhs.shape[0] == 0:
    _fail("rhs must have at least one group (G >= 1)")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    _fail(f"group_sizes must have an integer dtype, got {group_sizes.dtype}")
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(f"{name} must have a floating dtype, got {x.dtype}")
  if preferred_element_type is not None and not jnp.issubdtype(
      jnp.dtype(preferred_element_type), jnp.floating):
    _fail(f"preferred_element_type must be a floating dtype, got {preferred_element_type}")


def _check_tiling(tiling) -> tuple[int, int, int] | None:
  if tiling is None:
    return None
  ok = (isinstance(tiling, Sequence) and len(tiling) == 3
        and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t > 0
                for t in tiling))
  if not ok:
    _fail(f"tiling must be a (tm, tk, tn) tuple of positive ints, got {tiling!r}")
  return tuple(int(t) for t in tiling)


def _narrowest(*dtypes) -> np.dtype:
  return min((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)


def choose_tiling(backend: str, m: int, k: int, n: int, dtypes, tiling, interpret: bool):
  """(tm, tk, tn) for `backend`: the defaults, or `tiling` checked and fitted to the shapes."""
  narrow = _narrowest(*dtypes)
  if backend == "triton":
    if tiling is None:
      return triton.default_tiling(m, k, n, narrow)
    if not all(t >= triton.MIN_TILE and t & (t - 1) == 0 for t in tiling):
      _fail(f"triton tiles must be powers of two >= {triton.MIN_TILE}, got {tiling}")
    return tuple(triton.fit_tile(t, d) for t, d in zip(tiling, (m, k, n)))
  if tiling is None:
    return tpu.default_tiling(m, k, n, narrow)
  tm, tk, tn = tiling
  # Interpret mode takes any sublane-aligned tile; Mosaic wants packed rows and 128-lane blocks.
  sub = 8 if interpret else tpu.sublane_multiple(narrow)
  if tm % sub:
    _fail(f"tpu tm must be a multiple of {sub} for {narrow.name}, got tiling {tiling}")
  tk, tn = min(tk, k), min(tn, n)
  if not interpret and ((tk % tpu.LANE and tk != k) or (tn % tpu.LANE and tn != n)):
    _fail(f"tpu tk and tn must be multiples of {tpu.LANE} or cover the whole dim "
          f"(K={k}, N={n}), got tiling {tiling}")
  return tpu.fit_row_tile(tm, m, narrow), tk, tn


def grouped_matmul(lhs, rhs, group_sizes, *, backend=None, interpret=False, tiling=None,
                   preferred_element_type=None):
  """Grouped matmul: out[r] = lhs[r] @ rhs[g(r)] -> [M, N].

  lhs [M, K] holds rows sorted by group; group g owns the contiguous rows starting at
  sum(group_sizes[:g]); rhs [G, K, N]; group_sizes [G] integer with sum <= M. Rows at or beyond
  sum(group_sizes) are zero. Accumulates in float32; the result has dtype
  preferred_element_type (default lhs.dtype). Differentiable w.r.t. lhs and rhs.

  backend: None picks by platform (gpu -> "triton", tpu -> "tpu", else "xla"); "xla" is the
  lax.ragged_dot reference. interpret=True runs the chosen kernel on CPU. tiling: optional
  (tm, tk, tn) tiles of the M, K and N dims. Defaults: triton (128, 64, 128), tk=32 for float32,
  each shrunk to the smallest power of two >= 16 covering its dim; tpu tm=128 (a multiple of
  8, 16 for bf16, capped at M) and tk/tn the largest multiple of 128 <= 512 dividing K/N, else
  the full dim.
  """
  lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
  _check_inputs(lhs, rhs, group_sizes, preferred_element_type)
  backend = resolve_backend("grouped_matmul", backend, interpret)
  tiling = _check_tiling(tiling)
  out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
  (m, k), n = lhs.shape, rhs.shape[2]
  if backend == "xla":
    return reference_grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  tiles = choose_tiling(backend, m, k, n, (lhs.dtype, rhs.dtype, out_dtype), tiling, interpret)
  if m == 0 or k == 0 or n == 0:
    # Nothing to tile; zeros have the right (zero) gradients.
    return jnp.zeros((m, n), out_dtype)
  cfg = KernelConfig(backend=backend, tiling=tiles, out_dtype=out_dtype, interpret=interpret)
  return gmm_with_vjp(lhs, rhs, group_sizes.astype(jnp.int32), cfg)
