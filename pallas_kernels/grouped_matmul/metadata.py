"""The work plan shared by the grouped-matmul kernels (plain jnp, jittable, static shapes).

A work item is one (row tile, group) pair: the rows of `tile` that belong to `group`. Items are
ordered by group, then tile, so row tiles never decrease along the item axis; a kernel that keeps
an output row tile resident can rely on each tile being visited in one contiguous run.

The number of items depends on group_sizes (a traced value), so the plan has a static length
`num_items_bound` and the items past the real count are inactive: they repeat the last active
item's group and tile with an empty row range, so they neither change block indices nor write.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


class WorkPlan(NamedTuple):
  group_ids_I: jax.Array        # gmm: G marks the virtual trailing group (rows written as zeros)
  tile_ids_I: jax.Array         # row tile index (rows [tile * tm, tile * tm + tm))
  row_starts_I: jax.Array       # first row of the item's group; empty range when inactive
  row_ends_I: jax.Array         # one past the last row of the item's group
  first_of_tile_I: jax.Array    # 1 where the item is the first visit of its row tile
  first_of_group_I: jax.Array   # 1 where the item opens its group's run
  last_of_group_I: jax.Array    # 1 where the item closes its group's run


def num_items_bound(m: int, tm: int, num_groups: int) -> int:
  # Each group boundary can split a row tile once, and the virtual group adds one more boundary.
  return cdiv(m, tm) + num_groups + 1


def group_bounds(group_sizes_G: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """Row range [start, end) of every group, clamped to [0, m] (sizes < 0 count as 0)."""
  sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
  ends_G = jnp.minimum(jnp.cumsum(sizes_G), m).astype(jnp.int32)
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  return starts_G, ends_G


def make_work_plan(group_sizes_G: jax.Array, m: int, tm: int, *, for_tgmm: bool) -> WorkPlan:
  """Items for gmm (for_tgmm=False) or tgmm (for_tgmm=True).

  gmm: a virtual group G covers rows [sum(group_sizes), m) so those rows get written (as zeros);
  empty groups get no items. tgmm: no virtual group (those rows contribute nothing), and every
  empty group gets one item with an empty row range so its [K, N] output is written as zeros.
  """
  num_groups = group_sizes_G.shape[0]
  starts, ends = group_bounds(group_sizes_G, m)
  if not for_tgmm:
    starts = jnp.append(starts, ends[-1])
    ends = jnp.append(ends, jnp.int32(m))
  num_tiles = cdiv(m, tm)
  nonempty = ends > starts
  # Clamped because an empty group may start at row m (after every row is taken).
  first_tile = jnp.minimum(starts // tm, num_tiles - 1)
  last_tile = jnp.where(nonempty, (ends - 1) // tm, first_tile)
  counts = jnp.where(nonempty, last_tile - first_tile + 1, 1 if for_tgmm else 0)
  cum_counts = jnp.cumsum(counts).astype(jnp.int32)
  item_begin = cum_counts - counts
  total = cum_counts[-1]

  num_items = num_items_bound(m, tm, num_groups)
  item = jnp.arange(num_items, dtype=jnp.int32)
  group = jnp.searchsorted(cum_counts, item, side="right", method="compare_all")
  group = jnp.minimum(group, starts.shape[0] - 1).astype(jnp.int32)
  tile = first_tile[group] + item - item_begin[group]

  active = item < total
  last_active = jnp.maximum(total - 1, 0)
  group = jnp.where(active, group, group[last_active])
  tile = jnp.where(active, tile, tile[last_active])
  row_starts = jnp.where(active, starts[group], 0)
  row_ends = jnp.where(active, ends[group], 0)

  prev_tile = jnp.concatenate([jnp.full((1,), -1, jnp.int32), tile[:-1]])
  as_i32 = lambda b: b.astype(jnp.int32)
  return WorkPlan(
      group_ids_I=group.astype(jnp.int32),
      tile_ids_I=tile.astype(jnp.int32),
      row_starts_I=row_starts.astype(jnp.int32),
      row_ends_I=row_ends.astype(jnp.int32),
      first_of_tile_I=as_i32(active & (tile != prev_tile)),
      first_of_group_I=as_i32(active & (item == item_begin[group])),
      last_of_group_I=as_i32(active & (item == cum_counts[group] - 1)),
  )


def dtypes(lhs, other, out_dtype):
  """(output dtype: out_dtype or lhs's; compute dtype: the operands' promoted type), the rule
  every gmm / tgmm kernel follows."""
  out = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
  return out, jnp.promote_types(lhs.dtype, other.dtype)


class GmmSetup(NamedTuple):
  o_dim: int          # output columns: N, or K with transpose_rhs
  tc: int             # tile of the contracted dim
  to: int             # tile of the output columns
  out_dtype: object
  compute_dtype: object
  plan: WorkPlan


def gmm_setup(lhs_MC, rhs_G, group_sizes_G, *, tm, tk, tn, transpose_rhs, out_dtype):
  """What both backends' gmm derive from their arguments. rhs is always [G, K, N]: with
  transpose_rhs lhs is [M, N], contracted with rhs's N axis, and the output is [M, K]."""
  _, k_dim, n_dim = rhs_G.shape
  if transpose_rhs:
    o_dim, tc, to = k_dim, tn, tk
  else:
    o_dim, tc, to = n_dim, tk, tn
  out_dtype, compute_dtype = dtypes(lhs_MC, rhs_G, out_dtype)
  plan = make_work_plan(group_sizes_G, lhs_MC.shape[0], tm, for_tgmm=False)
  return GmmSetup(o_dim, tc, to, out_dtype, compute_dtype, plan)
