"""Expert parallelism: routed experts sharded over the `expert` mesh axis, token copies sent to
the devices holding their experts inside `shard_map`, and combined back.

Per device (n local tokens, k experts each, m = n*k copies, P expert-parallel devices):
  1. every token copy goes to device expert // (E / P); copies are ordered per destination by
     priority: guarded copies (affinity +inf) first, then routing affinity (the softmax score of
     that expert; -inf for padding tokens) descending, then copy index (token-major);
  2. dropless (evaluation, generation, capacity_factor None): every copy is kept. While training
     (`token_dropping()`) with a capacity factor c, a prefix of each destination's copies:
       capacity_rule "device" (DeepSeek-V2, the default): each receiving device computes at
         most ceil(c x average load) copies, the average load being all copies of the expert
         group / P = m. Senders first send each receiver the affinities of their best
         ceil(c m) unguarded copies for it (`device_rule_keep`: [P, ceil(c m)] float32, a
         fixed-size all_to_all) and their counts; the receiver keeps the highest affinities over
         all senders (ties: lower sender index, then the sender's order, i.e. lower global copy
         index) and answers each sender with how many of its copies it kept ([P] ints);
       capacity_rule "pair": each sender sends at most ceil(c m / P) copies to each receiver (no
         exchange before the data; drops more when routing is uneven: benchmarks/RESULTS.md).
     Guarded copies are kept whatever the budget: MoE marks the valid tokens of a
     capacity_guard_fraction of the rows (`guarded_rows`; DeepSeek-V2 keeps ~10% of the training
     sequences whole); a device whose guarded copies exceed its budget computes them all;
  3. `dispatch.exchange` moves the kept copies in buffers sized to the balanced load times
     `dispatch_headroom` (all_to_all: per (sender, receiver) pair; ragged_all_to_all: per
     receiver, with only the copies themselves sent), runs this device's E/P experts on what it
     received with the local grouped-matmul implementation (`moe_impl`), and brings the outputs
     back; copies beyond the buffers go in further rounds (exact, never dropped);
  4. the outputs are weighted and summed per token.
Which transport: ragged_all_to_all where the target platform (the mesh's devices:
`pallas_kernels.backends.target_platform`) has it, TPU and GPU; all_to_all on XLA:CPU, which is
where the tests run. With tensor > 1 the experts' hidden dimension is split over `tensor` and
partial outputs are summed with `psum`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from coder_jax.parallel.dispatch import Plan, exchange
from coder_jax.parallel.rules import logical_to_spec

_INV_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_DROPPING = contextvars.ContextVar("coder_jax_token_dropping", default=False)


@contextlib.contextmanager
def token_dropping(enabled: bool = True):
  """Within this context (at trace time) MoE layers with a capacity_factor drop tokens."""
  tok = _DROPPING.set(enabled)
  try:
    yield
  finally:
    _DROPPING.reset(tok)


def dropping_enabled() -> bool:
  return _DROPPING.get()


def guarded_rows(num_rows: int, fraction: float) -> np.ndarray:
  """[num_rows] bool: the rows whose copies are never dropped (DeepSeek-V2 keeps about 10% of
  the training sequences whole). Row i is guarded when frac((i + 1) / golden ratio) < fraction:
  a Weyl sequence, so any run of consecutive rows (one device's shard, one micro-batch) holds
  close to its share, without a random key. Rows are batch positions: the data pipeline puts
  other sequences there every step, so which sequences are guarded changes from step to step."""
  return np.mod((np.arange(num_rows) + 1) * _INV_GOLDEN, 1.0) < fraction


def capacity(n_copies: int, num_devices: int, capacity_factor: float | None, drop: bool) -> int:
  """The pair rule's budget: copies one device may send to each device."""
  if not drop or capacity_factor is None:
    return n_copies
  return max(1, min(n_copies, math.ceil(capacity_factor * n_copies / num_devices)))


def device_budget(n_copies: int, num_devices: int, capacity_factor: float) -> int:
  """The device rule's budget: copies one device computes, ceil(c x average load), where the
  average load (all copies of the expert group / P) is each device's own copy count."""
  return max(1, min(num_devices * n_copies, math.ceil(capacity_factor * n_copies)))


def dispatch_window(n_copies: int, num_devices: int, *, rule: str | None, budget: int,
                    headroom: float | None, ragged: bool) -> int:
  """Rows of one round: per (sender, receiver) pair (all_to_all) or per receiver (ragged).
  rule None is dropless (budget ignored)."""
  if rule == "pair":                        # the pair budget is itself the pair buffer
    return budget * (num_devices if ragged else 1)
  load = n_copies if rule is None else budget   # what a receiver computes when balanced
  most = num_devices * n_copies if rule is None else budget
  if ragged:
    return most if headroom is None else max(1, min(most, math.ceil(headroom * load)))
  pair_most = min(most, n_copies)
  return pair_most if headroom is None else max(1, min(pair_most,
                                                      math.ceil(headroom * load / num_devices)))


def ragged_platform() -> bool:
  """ragged_all_to_all exists on the target platform (TPU, GPU; not XLA:CPU)."""
  from pallas_kernels.backends import target_platform
  return target_platform() in ("tpu", "gpu", "cuda", "rocm")


def current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def sort_copies(experts_NK, affinity_NK, *, num_experts: int, num_devices: int):
  """Copies ordered by destination device, then priority (guarded, +inf affinity, first; then
  affinity descending), then copy index (token-major): (order [m], dest [m], rank in its
  destination's block [m], block sizes [P], guarded copies per block [P], sorted affinities)."""
  e_f = experts_NK.reshape(-1)
  a_f = affinity_NK.reshape(-1).astype(jnp.float32)
  m = e_f.shape[0]
  dest = e_f // (num_experts // num_devices)
  by_aff = jnp.argsort(-a_f, stable=True)
  order = by_aff[jnp.argsort(dest[by_aff], stable=True)]
  counts = jnp.bincount(dest, length=num_devices)
  guarded = jnp.bincount(dest, weights=(a_f == jnp.inf).astype(jnp.int32),
                         length=num_devices).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(m) - starts[dest[order]]
  rank = jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  return order, dest, rank, counts.astype(jnp.int32), guarded, a_f[order]


def _a2a_vec(v, axis):
  """Element r to device r; returns element s from device s ([P, ...] either way)."""
  return v if axis is None else jax.lax.all_to_all(v, axis, 0, 0, tiled=True)


def device_rule_keep(aff_sorted, starts, counts, guarded, *, budget: int, axis):
  """Kept copies per destination under the per-receiving-device budget.

  Each sender sends every receiver the affinities of its best min(budget, m) unguarded copies
  for it (sorted; a fixed [P, min(budget, m)] float32 all_to_all: at most 2P/D of the bytes of
  the m copies in bf16, 6% at P = 64, D = 2048) and its guarded / unguarded counts. A receiver
  keeps every guarded copy and fills what is left of `budget` with the highest affinities
  (ties: lower sender index, then the sender's own order, i.e. lower copy index: the global
  token order), and tells each sender how many were kept."""
  p = counts.shape[0]
  m = aff_sorted.shape[0]
  width = min(budget, m)               # no sender has more than m copies for one receiver
  i = jnp.arange(width)
  have = guarded[:, None] + i[None, :] < counts[:, None]
  pos = jnp.clip(starts[:, None] + guarded[:, None] + i[None, :], 0, m - 1)
  lists = _a2a_vec(jnp.where(have, aff_sorted[pos], -jnp.inf), axis)      # [sender, budget]
  g_from = _a2a_vec(guarded, axis)
  u_from = _a2a_vec(counts - guarded, axis)
  valid = (i[None, :] < u_from[:, None]).reshape(-1)
  left = jnp.maximum(budget - g_from.sum(), 0)
  o1 = jnp.argsort(-lists.reshape(-1), stable=True)
  o = o1[jnp.argsort(~valid[o1], stable=True)]
  taken_sorted = (jnp.arange(p * width) < left) & valid[o]
  taken = jnp.zeros((p * width,), jnp.int32).at[o].set(taken_sorted.astype(jnp.int32))
  return guarded + _a2a_vec(taken.reshape(p, width).sum(axis=1), axis)


def _local_moe(x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd, *, impl, dtype,
               num_experts, axis: str | None, num_devices: int, rule: str | None,
               capacity_factor, headroom, ragged: bool, sync_axes, tensor_axis):
  n, k = experts_NK.shape
  d = x_ND.shape[-1]
  m = n * k
  el = num_experts // num_devices
  order, dest, rank, counts, guarded, aff_sorted = sort_copies(
      experts_NK, affinity_NK, num_experts=num_experts, num_devices=num_devices)
  starts = jnp.cumsum(counts) - counts
  budget = 0
  if rule == "pair":
    budget = capacity(m, num_devices, capacity_factor, True)
    keep = jnp.maximum(jnp.minimum(counts, budget), guarded)
  elif rule == "device":
    budget = device_budget(m, num_devices, capacity_factor)
    keep = device_rule_keep(aff_sorted, starts, counts, guarded, budget=budget, axis=axis)
  else:
    keep = counts
  ragged = ragged and axis is not None
  window = dispatch_window(m, num_devices, rule=rule, budget=budget, headroom=headroom,
                           ragged=ragged)
  if ragged:
    all_start = jax.lax.all_gather(starts, axis)
    all_keep = jax.lax.all_gather(keep, axis)
  else:
    all_start = all_keep = jnp.zeros((num_devices, num_devices), jnp.int32)
  plan = Plan(order.astype(jnp.int32), starts.astype(jnp.int32), keep.astype(jnp.int32),
              (experts_NK.reshape(-1) % el).astype(jnp.int32), all_start.astype(jnp.int32),
              all_keep.astype(jnp.int32))

  def fn(rows, e, ok, g, u, dn):
    return impl(rows, e[:, None], ok[:, None].astype(jnp.float32), g, u, dn, dtype=dtype)

  y_sorted, _ = exchange(x_ND, (wg, wu, wd), plan, fn, k=k, num_devices=num_devices,
                         window=window, axis=axis, ragged=ragged, sync_axes=sync_axes,
                         dtype=dtype)
  kept = rank < keep[dest]
  pos = starts[dest] + rank
  back = jnp.where(kept[:, None], y_sorted[pos], 0)
  out = jnp.einsum("nkd,nk->nd", back.reshape(n, k, d).astype(jnp.float32), weights_NK)
  if tensor_axis is not None:
    out = jax.lax.psum(out, tensor_axis)
  return out.astype(dtype), kept.reshape(n, k)


def route_local(fn, logits_BTE):
  """fn(logits [B, T, E]) -> a pytree of [B, T, ...] arrays (the routing), run on each device's
  tokens in `shard_map` under a mesh: the partitioner gathers tokens for a top_k whose token
  axes are split (as a context axis splits T)."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1 or mesh.are_all_axes_manual:
    return fn(logits_BTE)
  spec = P(*logical_to_spec(("batch", "activation_length"), logits_BTE.shape[:2], mesh), None)
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(logits_BTE)


def experts_forward(cfg, x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd, *, impl, dtype,
                    return_kept: bool = False):
  """Routed-expert output [N, D]. Under a mesh that splits the batch, each device computes its own
  tokens inside `shard_map` (automatic partitioning would gather the routing sort and run every
  expert on the global batch); with expert > 1 or dropping, through the dispatch above.
  return_kept: also the [N, k] mask of copies that were computed.

  Tokens may also come as [B, T, ...] (x [B, T, D], the others [B, T, k]; outputs keep that
  layout): the layout MoE layers use, in which a context axis splitting T leaves each device
  its own tokens (flattening [B, T] with T split is not a contiguous split of B*T)."""
  mesh = current_mesh()
  ep = mesh.shape.get("expert", 1) if mesh is not None else 1
  drop = dropping_enabled() and cfg.capacity_factor is not None
  e = wg.shape[0]
  lead, k = experts_NK.shape[:-1], experts_NK.shape[-1]
  n = math.prod(lead)
  if e % ep:
    raise ValueError(f"expert parallelism: {e} routed experts cannot be split over the mesh's "
                     f"expert axis of {ep}")

  def local(x, ex, w, a, g, u, dn, fn):
    """fn on this device's tokens flattened to [n, ...]; results back in x's layout."""
    shape = ex.shape[:-1]
    flat = lambda v: v.reshape((-1,) + v.shape[len(shape):])
    y, kept = fn(flat(x), flat(ex), flat(w), flat(a), g, u, dn)
    return y.reshape(shape + y.shape[1:]), kept.reshape(shape + kept.shape[1:])

  rule = cfg.capacity_rule if drop else None
  opts = dict(impl=impl, dtype=dtype, num_experts=e, rule=rule,
              capacity_factor=cfg.capacity_factor, headroom=cfg.dispatch_headroom)
  if mesh is None or mesh.size == 1:
    def single(x, ex, w, a, g, u, dn):
      if drop:
        return _local_moe(x, ex, w, a, g, u, dn, axis=None, num_devices=1, ragged=False,
                          sync_axes=None, tensor_axis=None, **opts)
      return impl(x, ex, w, g, u, dn, dtype=dtype), jnp.ones(ex.shape, bool)
    y, kept = local(x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd, single)
    return (y, kept) if return_kept else y
  token_axes = ("batch",) if len(lead) == 1 else ("batch", "activation_length")
  tok_spec = tuple(logical_to_spec(token_axes, lead, mesh))
  split = [(a,) if isinstance(a, str) else tuple(a or ()) for a in tok_spec]
  if ep > 1 and "expert" not in split[0]:
    raise ValueError(f"expert parallelism: {lead[0]} rows cannot be split over the mesh's batch "
                     f"axes {dict(mesh.shape)}; the batch must be divisible by data x fsdp x "
                     "expert")
  w_spec = logical_to_spec(("experts", "embed", "expert_mlp"), wg.shape, mesh)
  tensor_axis = "tensor" if w_spec[2] == "tensor" else None
  w_in = P(w_spec[0], None, w_spec[2])      # gathered over fsdp at the boundary
  wd_in = P(w_spec[0], w_spec[2], None)
  tok = P(*tok_spec, None)

  def moe(x, ex, w, a, g, u, dn):
    if ep == 1 and not drop:  # this device's tokens through its (all) experts
      y = impl(x, ex, w, g, u, dn, dtype=dtype)
      if tensor_axis is not None:
        y = jax.lax.psum(y.astype(jnp.float32), tensor_axis).astype(dtype)
      return y, jnp.ones(ex.shape, bool)
    axis = "expert" if ep > 1 else None
    return _local_moe(x, ex, w, a, g, u, dn, axis=axis, num_devices=ep, ragged=ragged_platform(),
                      sync_axes=tuple(mesh.axis_names) if axis else None,
                      tensor_axis=tensor_axis, **opts)

  y, kept = jax.shard_map(lambda *a: local(*a, moe), mesh=mesh,
                          in_specs=(tok, tok, tok, tok, w_in, w_in, wd_in),
                          out_specs=(tok, tok), check_vma=False)(
      x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd)
  return (y, kept) if return_kept else y
