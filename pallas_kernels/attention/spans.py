"""Segment spans: where each position's document can be seen from, for block skipping."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def segment_spans(seg_BT, use_seg: bool = True):
  """(first, last) [B, T] int32: the first and last index holding each position's segment id.

  A query attends only within its id's span, so a block of queries needs only key blocks inside
  the union of its rows' spans (and a block of keys only such query blocks). Any ids work (a
  segment need not be contiguous): a stable sort groups equal ids in index order, so a group's
  first and last sorted entries are its first and last occurrences. Without segments the
  kernels never read the spans; the ids themselves are passed as placeholders.
  """
  if not use_seg:
    return seg_BT, seg_BT
  b, t = seg_BT.shape
  order = jnp.argsort(seg_BT, axis=1, stable=True).astype(jnp.int32)
  ids = jnp.take_along_axis(seg_BT, order, axis=1)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  ends = jnp.concatenate([ids[:, 1:] != ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
  start_at = lax.cummax(jnp.where(starts, pos, 0), axis=1)
  end_at = lax.cummin(jnp.where(ends, pos, t - 1), axis=1, reverse=True)
  first = jnp.take_along_axis(order, start_at, axis=1)
  last = jnp.take_along_axis(order, end_at, axis=1)
  unsort = lambda x: jnp.zeros_like(x).at[jnp.arange(b)[:, None], order].set(x)
  return unsort(first), unsort(last)


def query_rows(a_BS, q_offset: int, t: int):
  """Columns [q_offset, q_offset + t) of a key-side [B, S] array: the queries' entries when they
  are the last positions of the keys' sequence; edge-padded where the queries' padded rows run
  past the keys' padded end."""
  part = a_BS[:, q_offset:q_offset + t]
  return jnp.pad(part, ((0, 0), (0, t - part.shape[1])), mode="edge")
