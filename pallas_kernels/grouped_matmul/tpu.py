"""TPU grouped-matmul kernels in Pallas Mosaic.

The work plan is scalar-prefetched into SMEM and drives the index maps, so each grid step DMAs
exactly the lhs row tile and rhs[group] tile of its work item. Partial edge blocks (M, K or N not
a multiple of the tile) hold garbage past the array end, so every operand is masked with `where`
before the dot: garbage can only reach output rows/columns that are never written back.

Tiles are named by the dimension they split: tm splits rows (M), tk the K axis of rhs [G, K, N]
and tn its N axis, so the rhs block is [tk, tn] for every kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import metadata

LANE = 128
_MAX_LANE_TILE = 512


def sublane_multiple(dtype) -> int:
  """Row-tile granularity: 8 sublanes of 32-bit words, packed 2x for 16-bit types."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _lane_tile(dim: int) -> int:
  # The largest multiple of 128 (<= 512) dividing the dim avoids partial blocks; otherwise the
  # full dim is always a legal block.
  for t in range(_MAX_LANE_TILE, 0, -LANE):
    if dim % t == 0:
      return t
  return dim


def fit_row_tile(tm: int, m: int, dtype) -> int:
  sub = sublane_multiple(dtype)
  return min(tm, metadata.cdiv(m, sub) * sub)


def default_tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  return fit_row_tile(128, m, dtype), _lane_tile(k), _lane_tile(n)


def _dot_precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gmm_kernel(group_ids, tile_ids, row_starts, row_ends, first_of_tile,
                lhs_ref, rhs_ref, out_ref, acc_ref, *,
                tm, tc, c_dim, num_groups, transpose_rhs, compute_dtype):
  item, cb = pl.program_id(1), pl.program_id(2)
  start, end = row_starts[item], row_ends[item]
  row0 = tile_ids[item] * tm

  @pl.when(cb == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  # The virtual trailing group and padding items leave acc at zero.
  @pl.when((group_ids[item] < num_groups) & (end > start))
  def _():
    rows = row0 + lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
    keep = (rows >= start) & (rows < end)
    w = rhs_ref[...]
    if c_dim % tc:
      c_axis = 1 if transpose_rhs else 0
      keep &= cb * tc + lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 1) < c_dim
      w_cols = cb * tc + lax.broadcasted_iota(jnp.int32, w.shape, c_axis)
      w = jnp.where(w_cols < c_dim, w, jnp.zeros(w.shape, w.dtype))
    x = jnp.where(keep, lhs_ref[...], jnp.zeros(lhs_ref.shape, lhs_ref.dtype))
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(
        x.astype(compute_dtype), w.astype(compute_dtype), dims,
        precision=_dot_precision(compute_dtype), preferred_element_type=jnp.float32)

  # The output block stays resident while consecutive items share the row tile; each item
  # merges only its own rows so the items of one tile compose.
  is_last_c = cb == pl.num_programs(2) - 1
  is_first = first_of_tile[item] == 1

  def merged(prev):
    rows = row0 + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    in_group = (rows >= start) & (rows < end)
    return jnp.where(in_group, acc_ref[...].astype(out_ref.dtype), prev)

  @pl.when(is_last_c & is_first)
  def _():
    out_ref[...] = merged(jnp.zeros(out_ref.shape, out_ref.dtype))

  @pl.when(is_last_c & jnp.logical_not(is_first))
  def _():
    out_ref[...] = merged(out_ref[...])


def gmm(lhs_MC, rhs_G, group_sizes_G, *, tm, tk, tn, transpose_rhs=False, out_dtype=None,
        interpret=False):
  """out[r] = lhs[r] @ rhs[g(r)] (or @ rhs[g(r)]^T with transpose_rhs); rows past the groups = 0.

  rhs is always the [G, K, N] weight: transpose_rhs contracts lhs [M, N] with its N axis and
  returns [M, K] from [tk, tn] blocks, never materialising rhs^T.
  """
  m, c_dim = lhs_MC.shape
  num_groups = rhs_G.shape[0]
  o_dim, tc, to, out_dtype, compute_dtype, plan = metadata.gmm_setup(
      lhs_MC, rhs_G, group_sizes_G, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs,
      out_dtype=out_dtype)
  num_items = plan.group_ids_I.shape[0]

  def lhs_map(ob, item, cb, group_ids, tile_ids, *_):
    return tile_ids[item], cb

  def rhs_map(ob, item, cb, group_ids, *_):
    group = jnp.minimum(group_ids[item], num_groups - 1)
    return (group, ob, cb) if transpose_rhs else (group, cb, ob)

  def out_map(ob, item, cb, group_ids, tile_ids, *_):
    return tile_ids[item], ob

  rhs_block = (None, to, tc) if transpose_rhs else (None, tc, to)
  kernel = functools.partial(
      _gmm_kernel, tm=tm, tc=tc, c_dim=c_dim, num_groups=num_groups,
      transpose_rhs=transpose_rhs, compute_dtype=compute_dtype)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(metadata.cdiv(o_dim, to), num_items, metadata.cdiv(c_dim, tc)),
      in_specs=[pl.BlockSpec((tm, tc), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
      out_specs=pl.BlockSpec((tm, to), out_map),
      scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)],
  )
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, o_dim), out_dtype),
      grid_spec=grid_spec,
      # Items revisit the resident output tile, so only the output-column axis is parallel.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="gmm_dlhs" if transpose_rhs else "gmm",
  )(plan.group_ids_I, plan.tile_ids_I, plan.row_starts_I, plan.row_ends_I,
    plan.first_of_tile_I, lhs_MC, rhs_G)


def _tgmm_kernel(group_ids, tile_ids, row_starts, row_ends, first_of_group, last_of_group,
                 lhs_ref, dout_ref, out_ref, acc_ref, *, tm, compute_dtype):
  del group_ids
  item = pl.program_id(2)
  start, end = row_starts[item], row_ends[item]
  row0 = tile_ids[item] * tm

  @pl.when(first_of_group[item] == 1)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  @pl.when(end > start)
  def _():
    # Rows are the contraction, so rows outside the group (and edge-block garbage) must be 0
    # in both operands: 0 * NaN would still poison the sum.
    def masked(ref):
      rows = row0 + lax.broadcasted_iota(jnp.int32, ref.shape, 0)
      keep = (rows >= start) & (rows < end)
      return jnp.where(keep, ref[...], jnp.zeros(ref.shape, ref.dtype)).astype(compute_dtype)

    acc_ref[...] += lax.dot_general(
        masked(lhs_ref), masked(dout_ref), (((0,), (0,)), ((), ())),
        precision=_dot_precision(compute_dtype), preferred_element_type=jnp.float32)

  @pl.when(last_of_group[item] == 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tm, tk, tn, out_dtype=None, interpret=False):
  """out[g] = lhs[rows of g]^T @ dout[rows of g] -> [G, K, N]; empty groups give zeros."""
  m, k_dim = lhs_MK.shape
  n_dim = dout_MN.shape[1]
  num_groups = group_sizes_G.shape[0]
  out_dtype, compute_dtype = metadata.dtypes(lhs_MK, dout_MN, out_dtype)
  plan = metadata.make_work_plan(group_sizes_G, m, tm, for_tgmm=True)
  num_items = plan.group_ids_I.shape[0]

  def lhs_map(kb, nb, item, group_ids, tile_ids, *_):
    return tile_ids[item], kb

  def dout_map(kb, nb, item, group_ids, tile_ids, *_):
    return tile_ids[item], nb

  def out_map(kb, nb, item, group_ids, *_):
    return group_ids[item], kb, nb

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(metadata.cdiv(k_dim, tk), metadata.cdiv(n_dim, tn), num_items),
      in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
      out_specs=pl.BlockSpec((None, tk, tn), out_map),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm, compute_dtype=compute_dtype),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="tgmm",
  )(plan.group_ids_I, plan.tile_ids_I, plan.row_starts_I, plan.row_ends_I,
    plan.first_of_group_I, plan.last_of_group_I, lhs_MK, dout_MN)
