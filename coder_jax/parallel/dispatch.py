"""Moving kept token copies to the devices holding their experts and back, in bounded buffers.

Inside `shard_map`, each device has its copies ordered by destination device (`order`: a block
per destination, `start[r]` its first position, `count[r]` its size) and knows how many of each
block's leading copies are kept (`keep[r]`; kept copies are always a block's prefix). `exchange`
sends the kept copies, runs `fn` (the local experts) on what arrives, brings the outputs back and
returns them per sorted position (zero where not kept). Two transports:

  all_to_all (every platform; the only one on XLA:CPU): fixed [P, window] buffers, `window` copies
    per (sender, receiver) pair per round; the receiver computes P x window rows per round.
  ragged_all_to_all (TPU, GPU): a receiver takes `window` rows per round, filled with exactly the
    copies sent to it (senders' chunks packed one after another, sender order), so only the
    copies themselves cross the network and there are no empty slots between chunks (the rows
    past the last copy received are still computed, with weight 0, as are a pair buffer's).

Overflow is never dropped: when a pair (all_to_all) or a receiver (ragged) has more kept copies
than `window`, further rounds carry the rest, window by window, until every kept copy has been
computed (a window with room for the worst case needs no further round, and has none in the
program). Every device runs the same number of rounds (a `pmax` over `sync_axes`). Round 0 is
ordinary differentiable code; later rounds run in a `while_loop` under a custom VJP whose
backward pass recomputes each round's forward (rematerialised: the rare overflow costs one more
expert forward, and no memory is held for rounds that do not happen).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Indirection for tests: XLA:CPU has no ragged_all_to_all, so tests replace it by an emulation
# built from all_to_all to check the offsets arithmetic numerically.
ragged_all_to_all = jax.lax.ragged_all_to_all


class Plan(NamedTuple):
  """One device's view (ints, not differentiated). P = devices on the expert axis, m copies."""
  order: jnp.ndarray     # [m] copy index at each sorted position (destination-major)
  start: jnp.ndarray     # [P] first sorted position of each destination's block
  keep: jnp.ndarray      # [P] kept copies (a prefix of each block)
  local_e: jnp.ndarray   # [m] local expert id (on its destination) of each copy, copy order
  all_start: jnp.ndarray  # [P, P] start of every sender (row) for every receiver (ragged only)
  all_keep: jnp.ndarray  # [P, P] kept copies of every sender (row) for every receiver (ragged)


def _index(axis):
  return jax.lax.axis_index(axis) if axis is not None else 0


def _a2a_round(j, x_ND, params, plan: Plan, *, k, num_devices, window, axis, fn, dtype):
  """Round j of the all_to_all transport: per pair the kept copies [j*window, (j+1)*window)."""
  m, d = plan.order.shape[0], x_ND.shape[-1]
  i = j * window + jnp.arange(window)
  valid = i[None, :] < plan.keep[:, None]                        # [P, S]
  pos = jnp.where(valid, plan.start[:, None] + i[None, :], 0)
  copy = plan.order[pos]
  send_x = jnp.where(valid[..., None], x_ND.astype(dtype)[copy // k], 0)
  send_e = jnp.where(valid, plan.local_e[copy], 0)
  valid_r = valid.astype(jnp.int32)
  if axis is not None:
    a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
    send_x, send_e, valid_r = a2a(send_x), a2a(send_e), a2a(valid_r)
  rows = num_devices * window
  y = fn(send_x.reshape(rows, d), send_e.reshape(rows), valid_r.reshape(rows) > 0, *params)
  y = y.reshape(num_devices, window, d)
  if axis is not None:
    y = jax.lax.all_to_all(y, axis, 0, 0, tiled=True)
  return jnp.zeros((m, d), y.dtype).at[jnp.where(valid, pos, m)].add(y, mode="drop")


def _ragged_round(j, x_ND, params, plan: Plan, *, k, num_devices, window, axis, fn, dtype):
  """Round j of the ragged transport: receiver r takes positions [j*window, (j+1)*window) of
  its incoming stream (sender 0's kept copies, then sender 1's, ...)."""
  m, d = plan.order.shape[0], x_ND.shape[-1]
  me = _index(axis)
  off = jnp.cumsum(plan.all_keep, axis=0) - plan.all_keep        # [s, r] stream offset
  lo = jnp.clip(off, j * window, (j + 1) * window)
  hi = jnp.clip(off + plan.all_keep, j * window, (j + 1) * window)
  size = (hi - lo).astype(jnp.int32)                             # [s, r] rows this round
  nz = lambda v, s: jnp.where(s > 0, v, 0).astype(jnp.int32)
  operand = x_ND.astype(dtype)[plan.order // k]                  # copies in sorted order
  local_e = plan.local_e[plan.order]
  send = (nz(plan.all_start[me] + lo[me] - off[me], size[me]), size[me],
          nz(lo[me] - j * window, size[me]), size[:, me])
  recv_x = ragged_all_to_all(operand, jnp.zeros((window, d), dtype), *send, axis_name=axis)
  recv_e = ragged_all_to_all(local_e, jnp.zeros((window,), local_e.dtype), *send, axis_name=axis)
  total = plan.all_keep[:, me].sum()
  ok = jnp.arange(window) < jnp.clip(total - j * window, 0, window)
  y = fn(recv_x, jnp.where(ok, recv_e, 0), ok, *params)
  back = (nz(lo[:, me] - j * window, size[:, me]), size[:, me],
          nz(plan.all_start[:, me] + lo[:, me] - off[:, me], size[:, me]), size[me])
  return ragged_all_to_all(y, jnp.zeros((m, d), y.dtype), *back, axis_name=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _later_rounds(round_fn, rounds, x_ND, params, plan):
  """sum over j in [1, rounds) of round_fn(j, x, params, plan)."""
  return _later_fwd(round_fn, rounds, x_ND, params, plan)[0]


def _later_fwd(round_fn, rounds, x_ND, params, plan):
  out = jax.eval_shape(lambda: round_fn(0, x_ND, params, plan))
  y = jax.lax.fori_loop(1, rounds, lambda j, acc: acc + round_fn(j, x_ND, params, plan),
                        jnp.zeros(out.shape, out.dtype))
  return y, (rounds, x_ND, params, plan)


def _later_bwd(round_fn, res, g):
  rounds, x_ND, params, plan = res

  def body(j, acc):
    _, vjp = jax.vjp(lambda x, p: round_fn(j, x, p, plan), x_ND, params)
    return jax.tree.map(jnp.add, acc, vjp(g))

  zeros = jax.tree.map(jnp.zeros_like, (x_ND, params))
  dx, dp = jax.lax.fori_loop(1, rounds, body, zeros)
  return None, dx, dp, jax.tree.map(lambda _: None, plan)


_later_rounds.defvjp(_later_fwd, _later_bwd)


def rounds_needed(plan: Plan, *, window: int, ragged: bool, sync_axes) -> jnp.ndarray:
  """Rounds that carry every kept copy, the same on every device of `sync_axes`."""
  load = plan.all_keep.sum(axis=0).max() if ragged else plan.keep.max()
  n = (load + window - 1) // window
  if sync_axes:
    n = jax.lax.pmax(n, tuple(sync_axes))
  return jnp.maximum(n, 1).astype(jnp.int32)


def exchange(x_ND, params, plan: Plan, fn: Callable, *, k: int, num_devices: int, window: int,
             axis, ragged: bool, sync_axes, dtype):
  """Outputs [m, D] per sorted position of fn(rows [R, D], local expert [R], valid [R], *params)
  computed on the destination devices (zero rows where not kept), and the rounds it took."""
  round_fn = functools.partial(_ragged_round if ragged else _a2a_round, k=k,
                               num_devices=num_devices, window=window, axis=axis, fn=fn,
                               dtype=dtype)
  y = round_fn(0, x_ND, params, plan)
  m = plan.order.shape[0]
  if window >= (num_devices * m if ragged else m):   # room for the worst case: one round
    return y, jnp.ones((), jnp.int32)
  rounds = rounds_needed(plan, window=window, ragged=ragged, sync_axes=sync_axes)
  return y + _later_rounds(round_fn, rounds, x_ND, params, plan), rounds
