"""GPU grouped-matmul kernels in Pallas Triton.

Every ref is passed whole (no BlockSpecs) and tiles are read with masked loads: Triton needs
power-of-two blocks, and masking the M/K/N tails in the kernel avoids padding rhs, the big expert
weight tensor. Metadata (the work plan) arrives as plain int32 inputs because the Triton lowering
has no scalar prefetch; a program reads its entries with its program id.

Tiles are named by the dimension they split, not by their role: tm splits rows (M), tk splits
the K axis of rhs [G, K, N] and tn its N axis, so the rhs tile is [tk, tn] for every kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import metadata

# tt.dot needs every operand dim >= 16.
MIN_TILE = 16
# Leave headroom under H100's ~227 KiB of shared memory for Triton's own scratch.
_SMEM_BUDGET_BYTES = 160 * 1024


def _next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def fit_tile(tile: int, dim: int) -> int:
  """Shrink a tile to the smallest power of two covering `dim` (never below MIN_TILE)."""
  return min(tile, max(MIN_TILE, _next_pow2(dim)))


def default_tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  # 128x128 output tiles with a 64-deep K step keep bf16 tensor cores fed on H100; float32
  # halves the K step so a stage stays at 32 KiB of shared memory.
  tk = 64 if jnp.dtype(dtype).itemsize <= 2 else 32
  return fit_tile(128, m), fit_tile(tk, k), fit_tile(128, n)


def _compiler_params(out_elems: int, stage_elems: int, dtype) -> plgpu.CompilerParams:
  """Launch settings from the accumulator's and one pipeline stage's element counts."""
  itemsize = jnp.dtype(dtype).itemsize
  # 8 warps from 128 x 128 register-resident elements: over 4 warps that is 128 registers a
  # thread, and such tiles spilled on H100 (compile_report). The accumulator always lives in
  # registers; float32 dots run IEEE on FMA units (_dot_precision), so their operand tiles do too.
  in_registers = max(out_elems, stage_elems) if itemsize >= 4 else out_elems
  num_warps = 8 if in_registers >= 128 * 128 else 4
  num_stages = max(1, min(4, _SMEM_BUDGET_BYTES // max(stage_elems * itemsize, 1)))
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _mask_2d(rows, cols, shape):
  """[R, C] mask from optional 1-D row / column masks; None when both are None (no mask)."""
  if rows is None and cols is None:
    return None
  rows = jnp.ones((shape[0],), jnp.bool_) if rows is None else rows
  cols = jnp.ones((shape[1],), jnp.bool_) if cols is None else cols
  return rows[:, None] & cols[None, :]


def _dot_precision(dtype):
  # Triton's default for float32 is TF32; ask for IEEE so float32 stays float32-exact.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *,
                tm, tc, to, c_dim, o_dim, num_groups, transpose_rhs, compute_dtype):
  item, ob = pl.program_id(0), pl.program_id(1)
  group = group_ref[item]
  row0 = tile_ref[item] * tm
  start, end = start_ref[item], end_ref[item]
  rows_T = row0 + jnp.arange(tm, dtype=jnp.int32)
  # The masks keep loads/stores in bounds and stop an item touching another group's rows.
  row_mask_T = (rows_T >= start) & (rows_T < end)
  o_mask_O = None
  if o_dim % to:
    o_mask_O = ob * to + jnp.arange(to, dtype=jnp.int32) < o_dim
  rhs_group = jnp.minimum(group, num_groups - 1)
  # The virtual trailing group and padding items skip the loop: their acc stays zero.
  # Both branches are strong int32: Pallas' Triton lowering gives weakly typed literals in a
  # select the predicate's type, so plain Python ints made the loop bound an i1 (true / false,
  # not the trip count), which Triton's verifier rejects beside the i32 lower bound.
  num_c = jnp.where((group < num_groups) & (end > start),
                    jnp.int32(metadata.cdiv(c_dim, tc)), jnp.int32(0))
  precision = _dot_precision(compute_dtype)

  def body(cb, acc_TO):
    c_mask_C = None
    if c_dim % tc:
      c_mask_C = cb * tc + jnp.arange(tc, dtype=jnp.int32) < c_dim
    x_mask = _mask_2d(row_mask_T, c_mask_C, (tm, tc))
    x_TC = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(cb * tc, tc)], mask=x_mask, other=0)
    if transpose_rhs:
      w_mask = _mask_2d(o_mask_O, c_mask_C, (to, tc))
      w_ref = rhs_ref.at[rhs_group, pl.ds(ob * to, to), pl.ds(cb * tc, tc)]
      dims = (((1,), (1,)), ((), ()))
    else:
      w_mask = _mask_2d(c_mask_C, o_mask_O, (tc, to))
      w_ref = rhs_ref.at[rhs_group, pl.ds(cb * tc, tc), pl.ds(ob * to, to)]
      dims = (((1,), (0,)), ((), ()))
    # Unmasked when K and N divide the tiles, so the weight loads stay fully vectorised.
    w = plgpu.load(w_ref, mask=w_mask, other=None if w_mask is None else 0)
    return acc_TO + lax.dot_general(
        x_TC.astype(compute_dtype), w.astype(compute_dtype), dims,
        precision=precision, preferred_element_type=jnp.float32)

  acc_TO = lax.fori_loop(0, num_c, body, jnp.zeros((tm, to), jnp.float32))
  out_mask = _mask_2d(row_mask_T, o_mask_O, (tm, to))
  plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(ob * to, to)],
              acc_TO.astype(out_ref.dtype), mask=out_mask)


def gmm(lhs_MC, rhs_G, group_sizes_G, *, tm, tk, tn, transpose_rhs=False, out_dtype=None,
        interpret=False):
  """out[r] = lhs[r] @ rhs[g(r)] (or @ rhs[g(r)]^T with transpose_rhs); rows past the groups = 0.

  rhs is always the [G, K, N] weight: transpose_rhs contracts lhs [M, N] with its N axis and
  returns [M, K], reading [tk, tn] tiles transposed instead of materialising rhs^T.
  """
  m, c_dim = lhs_MC.shape
  num_groups = rhs_G.shape[0]
  o_dim, tc, to, out_dtype, compute_dtype, plan = metadata.gmm_setup(
      lhs_MC, rhs_G, group_sizes_G, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs,
      out_dtype=out_dtype)
  num_items = plan.group_ids_I.shape[0]
  kernel = functools.partial(
      _gmm_kernel, tm=tm, tc=tc, to=to, c_dim=c_dim, o_dim=o_dim, num_groups=num_groups,
      transpose_rhs=transpose_rhs, compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, o_dim), out_dtype),
      grid=(num_items, metadata.cdiv(o_dim, to)),
      compiler_params=_compiler_params(tm * to, tm * tc + tc * to, compute_dtype),
      interpret=interpret,
      name="gmm_dlhs" if transpose_rhs else "gmm",
  )(plan.group_ids_I, plan.tile_ids_I, plan.row_starts_I, plan.row_ends_I, lhs_MC, rhs_G)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn, k_dim, n_dim,
                 compute_dtype):
  group, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = start_ref[group], end_ref[group]
  first_tile = start // tm
  # Empty groups run zero iterations and store a zero tile.
  num_t = jnp.where(end > start, (end + tm - 1) // tm - first_tile, 0)
  k_mask_K = kb * tk + jnp.arange(tk, dtype=jnp.int32) < k_dim if k_dim % tk else None
  n_mask_N = nb * tn + jnp.arange(tn, dtype=jnp.int32) < n_dim if n_dim % tn else None
  precision = _dot_precision(compute_dtype)

  def body(t, acc_KN):
    row0 = (first_tile + t) * tm
    rows_T = row0 + jnp.arange(tm, dtype=jnp.int32)
    # Rows are the contraction here, so rows of other groups must load as exact zeros.
    row_mask_T = (rows_T >= start) & (rows_T < end)
    x_TK = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(kb * tk, tk)],
                      mask=_mask_2d(row_mask_T, k_mask_K, (tm, tk)), other=0)
    d_TN = plgpu.load(dout_ref.at[pl.ds(row0, tm), pl.ds(nb * tn, tn)],
                      mask=_mask_2d(row_mask_T, n_mask_N, (tm, tn)), other=0)
    return acc_KN + lax.dot_general(
        x_TK.astype(compute_dtype), d_TN.astype(compute_dtype), (((0,), (0,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32)

  acc_KN = lax.fori_loop(0, num_t, body, jnp.zeros((tk, tn), jnp.float32))
  plgpu.store(out_ref.at[group, pl.ds(kb * tk, tk), pl.ds(nb * tn, tn)],
              acc_KN.astype(out_ref.dtype), mask=_mask_2d(k_mask_K, n_mask_N, (tk, tn)))


def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tm, tk, tn, out_dtype=None, interpret=False):
  """out[g] = lhs[rows of g]^T @ dout[rows of g] -> [G, K, N]; empty groups give zeros."""
  m, k_dim = lhs_MK.shape
  n_dim = dout_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  out_dtype, compute_dtype = metadata.dtypes(lhs_MK, dout_MN, out_dtype)
  starts_G, ends_G = metadata.group_bounds(group_sizes_G, m)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, k_dim=k_dim, n_dim=n_dim,
                             compute_dtype=compute_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid=(num_groups, metadata.cdiv(k_dim, tk), metadata.cdiv(n_dim, tn)),
      compiler_params=_compiler_params(tk * tn, tm * tk + tm * tn, compute_dtype),
      interpret=interpret,
      name="tgmm",
  )(starts_G, ends_G, lhs_MK, dout_MN)
