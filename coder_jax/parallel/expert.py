"""Expert parallelism: routed experts sharded over the `expert` mesh axis, token copies sent to
the devices holding their experts with `all_to_all` inside `shard_map`, and combined back.

Per device (n local tokens, k experts each, P expert-parallel devices):
  1. every token copy goes to device expert // (E / P);
  2. at most C copies go from one device to each device: dropless C = n*k (nothing can be
     dropped); capacity mode C = ceil(capacity_factor * n*k / P), and a device keeps, for each
     destination, the C copies with the highest routing affinity (softmax score of that expert,
     -inf for padding tokens; ties: lower token index first) and drops the rest.
     DeepSeek-V2 budgets each receiving device over all senders; a budget per (sender,
     receiver) pair is what fixed-size all_to_all buffers allow without a second exchange, and
     it drops more under uneven routing (the receiver-side rule is future work);
  3. `all_to_all` over `expert` moves [P, C, d] buffers; each device runs its E/P experts on
     what it received with the local grouped-matmul implementation (`moe_impl`);
  4. a second `all_to_all` returns the outputs, which are weighted and summed per token.
Dropping happens only inside `token_dropping()` (the trainer's train step); evaluation and
generation are dropless. With tensor > 1 the experts' hidden dimension is split over `tensor`
and partial outputs are summed with `psum`. XLA:CPU implements `all_to_all` (not
`ragged_all_to_all`), so this path runs, and is tested, on fake CPU devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coder_jax.parallel.rules import logical_to_spec

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


def capacity(n_copies: int, num_devices: int, capacity_factor: float | None, drop: bool) -> int:
  """Copies one device may send to each device."""
  if not drop or capacity_factor is None:
    return n_copies
  return max(1, min(n_copies, math.ceil(capacity_factor * n_copies / num_devices)))


def current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def dispatch_plan(experts_NK, affinity_NK, *, num_experts: int, num_devices: int, cap: int):
  """Where each token copy goes: (destination device, slot in its [cap] buffer, kept) per copy,
  flattened token-major ([n*k])."""
  e_f = experts_NK.reshape(-1)
  a_f = affinity_NK.reshape(-1).astype(jnp.float32)
  m = e_f.shape[0]
  dest = e_f // (num_experts // num_devices)
  # Order: by destination, then affinity descending, then copy index (stable sorts).
  by_aff = jnp.argsort(-a_f, stable=True)
  order = by_aff[jnp.argsort(dest[by_aff], stable=True)]
  counts = jnp.bincount(dest, length=num_devices)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(m) - starts[dest[order]]
  rank = jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  return dest, rank, rank < cap


def _local_moe(x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd, *, impl, dtype,
               num_experts, axis: str | None, num_devices: int, cap: int, tensor_axis):
  n, k = experts_NK.shape
  d = x_ND.shape[-1]
  el = num_experts // num_devices
  dest, rank, keep = dispatch_plan(experts_NK, affinity_NK, num_experts=num_experts,
                                   num_devices=num_devices, cap=cap)
  slot = jnp.where(keep, dest * cap + rank, num_devices * cap)  # dropped -> out of bounds
  tok = jnp.arange(n * k) // k
  send_x = jnp.zeros((num_devices * cap, d), dtype).at[slot].set(
      x_ND.astype(dtype)[tok], mode="drop")
  send_e = jnp.zeros((num_devices * cap,), jnp.int32).at[slot].set(
      experts_NK.reshape(-1) % el, mode="drop")
  send_ok = jnp.zeros((num_devices * cap,), jnp.float32).at[slot].set(1.0, mode="drop")
  if axis is not None:
    def a2a(v):
      v = v.reshape((num_devices, cap) + v.shape[1:])
      return jax.lax.all_to_all(v, axis, 0, 0, tiled=True).reshape((num_devices * cap,) + v.shape[2:])
    recv_x, recv_e, recv_ok = a2a(send_x), a2a(send_e), a2a(send_ok)
  else:
    recv_x, recv_e, recv_ok = send_x, send_e, send_ok
  # Each received row is one copy for one local expert; empty slots get weight 0.
  y = impl(recv_x, recv_e[:, None], recv_ok[:, None], wg, wu, wd, dtype=dtype)
  if axis is not None:
    y = jax.lax.all_to_all(y.reshape(num_devices, cap, d), axis, 0, 0, tiled=True
                           ).reshape(num_devices * cap, d)
  back = jnp.where(keep[:, None], y.at[slot].get(mode="fill", fill_value=0), 0)
  out = jnp.einsum("nkd,nk->nd", back.reshape(n, k, d).astype(jnp.float32), weights_NK)
  if tensor_axis is not None:
    out = jax.lax.psum(out, tensor_axis)
  return out.astype(dtype), keep.reshape(n, k)


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

  if mesh is None or mesh.size == 1:
    def single(x, ex, w, a, g, u, dn):
      if drop:
        return _local_moe(x, ex, w, a, g, u, dn, impl=impl, dtype=dtype, num_experts=e,
                          axis=None, num_devices=1,
                          cap=capacity(n * k, 1, cfg.capacity_factor, True), tensor_axis=None)
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
  shards = math.prod(mesh.shape[a] for axes in split for a in axes)
  n_local = n // shards
  cap = capacity(n_local * k, ep, cfg.capacity_factor, drop)
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
    return _local_moe(x, ex, w, a, g, u, dn, impl=impl, dtype=dtype, num_experts=e,
                      axis="expert" if ep > 1 else None, num_devices=ep, cap=cap,
                      tensor_axis=tensor_axis)

  y, kept = jax.shard_map(lambda *a: local(*a, moe), mesh=mesh,
                          in_specs=(tok, tok, tok, tok, w_in, w_in, wd_in),
                          out_specs=(tok, tok), check_vma=False)(
      x_ND, experts_NK, weights_NK, affinity_NK, wg, wu, wd)
  return (y, kept) if return_kept else y
