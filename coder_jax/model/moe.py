"""DeepSeekMoE: float32 softmax router, greedy / group-limited top-k, routed + shared experts.

An expert implementation is any function with the signature of `ragged_experts`; register it with
`register_moe_impl(name, fn)` and pick it with `ModelConfig.moe_impl`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.model.config import ModelConfig
from coder_jax.model.layers import MLP, dtype_of, normal_param, token_dot
from coder_jax.model.registry import ImplRegistry

_MOE_IMPLS = ImplRegistry("moe_impl")
register_moe_impl = _MOE_IMPLS.register
get_moe_impl = _MOE_IMPLS.get


class RouterOutput(NamedTuple):
  scores_NE: jnp.ndarray     # softmax over all routed experts, float32
  experts_NK: jnp.ndarray    # chosen expert ids, int32
  weights_NK: jnp.ndarray    # combine weights (after scaling / normalisation), float32
  kept_NK: jnp.ndarray | None = None   # copies computed (False: dropped at capacity); MoE sets it


def _keep_best_groups(scores_NE, num_groups: int, keep: int):
  """Zero every expert outside the `keep` groups (of `num_groups` contiguous ones) whose best
  expert scores highest."""
  n, e = scores_NE.shape
  group_best = scores_NE.reshape(n, num_groups, e // num_groups).max(axis=-1)
  _, top_groups = jax.lax.top_k(group_best, keep)
  # A comparison, not a scatter: a scatter along a context-split token axis gathers it.
  keep_group = (top_groups[..., None] == jnp.arange(num_groups)).any(axis=-2)
  return jnp.where(jnp.repeat(keep_group, e // num_groups, axis=1), scores_NE, 0.0)


def route(logits_NE, cfg: ModelConfig) -> RouterOutput:
  scores = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  k = cfg.num_experts_per_tok
  choose_from = scores
  if cfg.topk_method == "group_limited_greedy":
    choose_from = _keep_best_groups(scores, cfg.n_group, cfg.topk_group)
  if cfg.routing_device_limit is not None and cfg.routing_device_limit < cfg.routing_devices:
    # Device-limited routing: keep the M devices holding the highest-affinity experts.
    choose_from = _keep_best_groups(choose_from, cfg.routing_devices, cfg.routing_device_limit)
  weights, experts = jax.lax.top_k(choose_from, k)
  if k > 1 and cfg.norm_topk_prob:
    # DeepSeek-V2's rule: normalised weights replace the routed scaling.
    weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
  else:
    weights = weights * cfg.routed_scaling_factor
  return RouterOutput(scores, experts.astype(jnp.int32), weights)


def sort_permutation(flat_M):
  """(order, inverse): the stable sort of the copies' expert ids and its inverse permutation."""
  order = jnp.argsort(flat_M, stable=True)
  return order, jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x_RD, index_M, inverse_M, k: int):
  """x[index // k], where `index` is a permutation of the R*k copies of x's R rows (copy c of row
  c // k) and `inverse` its inverse. The gradient is a gather too (JAX's own is a scatter-add,
  slow on CPU and GPU): d x[r] = sum over j < k of d out[inverse[r*k + j]]."""
  return x_RD[index_M // k]


def _take_rows_fwd(x_RD, index_M, inverse_M, k):
  return x_RD[index_M // k], (index_M, inverse_M)


def _take_rows_bwd(k, res, d_MD):
  index_M, inverse_M = res
  # k gathers added in one fusion (one gather then a sum over k is 3x slower on XLA:CPU).
  by_copy = inverse_M.reshape(-1, k)
  dx = sum(d_MD[by_copy[:, j]].astype(jnp.float32) for j in range(k)).astype(d_MD.dtype)
  none = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return dx, none(index_M), none(inverse_M)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def sorted_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype,
                   matmul=jax.lax.ragged_dot):
  """Sort token copies by expert, run each expert's SwiGLU with a grouped matmul
  `matmul(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]`, unsort and combine."""
  n, k = experts_NK.shape
  e = w_gate_EDF.shape[0]
  flat = experts_NK.reshape(-1)
  # Both reorderings and their gradients are gathers (GPU scatters are slow).
  order, inverse = sort_permutation(flat)
  xs = take_rows(x_ND.astype(dtype), order, inverse, k)
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  g = matmul(xs, w_gate_EDF.astype(dtype), sizes)
  u = matmul(xs, w_up_EDF.astype(dtype), sizes)
  y = matmul(jax.nn.silu(g) * u, w_down_EFD.astype(dtype), sizes)
  y = take_rows(y, inverse, order, 1).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)


ragged_experts = sorted_experts  # lax.ragged_dot, the XLA grouped matmul


def dense_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype):
  """Every expert on every token, combined with a dense [N, E] weight matrix. Small configs only."""
  e = w_gate_EDF.shape[0]
  # The experts as a batch dimension of both operands: the weights are read in their stored
  # layout (an "nd,edf" product makes XLA:CPU transpose every expert's weights each call).
  x = jnp.broadcast_to(x_ND.astype(dtype), (e,) + x_ND.shape)
  g = jnp.einsum("end,edf->enf", x, w_gate_EDF.astype(dtype))
  u = jnp.einsum("end,edf->enf", x, w_up_EDF.astype(dtype))
  y = jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, w_down_EFD.astype(dtype))
  combine = jnp.einsum("nk,nke->ne", weights_NK, jax.nn.one_hot(experts_NK, e, dtype=jnp.float32))
  return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine).astype(dtype)


def gathered_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype):
  """Each token copy multiplied by its own expert's weights, gathered: reads only the routed
  experts (N k weight sets), so it pays when copies are fewer than experts (decoding a few rows)."""
  x = x_ND.astype(dtype)
  g = jnp.einsum("nd,nkdf->nkf", x, w_gate_EDF[experts_NK].astype(dtype))
  u = jnp.einsum("nd,nkdf->nkf", x, w_up_EDF[experts_NK].astype(dtype))
  y = jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(g) * u, w_down_EFD[experts_NK].astype(dtype))
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)


def slot_capacity(n: int, k: int, e: int) -> int:
  """Rows per expert in `slotted_experts`: twice the mean group (N k / E), a multiple of 8."""
  return max(8, -(-2 * n * k // e // 8) * 8)


def slotted_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype,
                    capacity: int):
  """Each expert's copies in `capacity` slots, one batched product over [E, capacity] rows;
  exact: when a group is larger (a step whose routing is that uneven), the dense product runs
  instead (a `lax.cond`, so only one of the two runs). Pays between the gathered and the chunked
  paths (a decode step of tens of rows): E * capacity rows where the dense product takes E * N."""
  n, k = experts_NK.shape
  e = w_gate_EDF.shape[0]
  flat = experts_NK.reshape(-1)
  onehot = flat[:, None] == jnp.arange(e, dtype=flat.dtype)[None, :]            # [M, E]
  slot = jnp.sum(jnp.where(onehot, jnp.cumsum(onehot, axis=0) - 1, 0), axis=1)  # rank in group

  def slotted(x_ND, weights_NK):
    dest = flat * capacity + slot
    # The token each slot holds; empty slots compute token 0's row, which nobody reads.
    token = jnp.zeros((e * capacity,), jnp.int32).at[dest].set(
        jnp.arange(n * k, dtype=jnp.int32) // k, unique_indices=True)
    xs = x_ND.astype(dtype)[token].reshape(e, capacity, -1)
    g = jnp.einsum("ecd,edf->ecf", xs, w_gate_EDF.astype(dtype))
    u = jnp.einsum("ecd,edf->ecf", xs, w_up_EDF.astype(dtype))
    y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w_down_EFD.astype(dtype))
    y = y.reshape(e * capacity, -1)[dest].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)

  def dense(x_ND, weights_NK):
    return dense_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD,
                         dtype=dtype)

  return jax.lax.cond(jnp.max(slot) < capacity, slotted, dense, x_ND, weights_NK)


def _swiglu_tile(x_RD, wg_DF, wu_DF, wd_FD):
  g, u = x_RD @ wg_DF, x_RD @ wu_DF
  return g, u, (jax.nn.silu(g) * u) @ wd_FD


def _each_chunk(body, carry, starts_E, sizes_E, weights, chunks, local):
  """Experts in order, and for each the chunks of rows covering its group (rows start..start+size
  of the expert-sorted copies): `chunks[0]` rows at a time while a whole chunk is left, then the
  next size, the last size for the rest. carry, local = body(carry, local, row, rows, end,
  expert_weights); `local` starts from the given value for every expert and is returned stacked
  ([E, ...]). A last chunk may run past its group into later groups' rows: whatever it writes
  there is written again when their expert comes, so every row ends with its own expert's."""

  def expert(carry, inp):
    start, size, w = inp
    end = start + size
    state = (carry, local, start)
    for j, c in enumerate(chunks):
      left = end - state[2]
      n = (left + c - 1) // c if j == len(chunks) - 1 else left // c

      def step(_, s, c=c):
        carry, acc, row = s
        return (*body(carry, acc, row, c, end, w), row + c)

      state = jax.lax.fori_loop(0, n, step, state)
    return state[0], state[1]

  return jax.lax.scan(expert, carry, (starts_E, sizes_E, weights))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked_swiglu(x_MD, starts_E, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, chunks):
  """y[i] = SwiGLU of row i with its expert's weights; rows sorted by expert, expert e's group
  at rows starts[e]..starts[e]+sizes[e]. Each expert's weights are sliced once and its rows run
  in chunks (`_each_chunk`): no group is padded (rows a last chunk runs into past its group
  are computed and written again by their own expert). The gradient is written by hand: each
  expert's weight gradient is summed in a float32 loop carry."""
  return _chunked_swiglu_fwd(x_MD, starts_E, sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD,
                             chunks)[0]


def _chunked_swiglu_fwd(x_MD, starts_E, sizes_E, wg, wu, wd, chunks):
  (m, d), f, pad = x_MD.shape, wg.shape[-1], max(chunks)
  xp = jnp.concatenate([x_MD, jnp.zeros((pad, d), x_MD.dtype)])

  def body(bufs, local, row, rows, end, w):
    out = _swiglu_tile(jax.lax.dynamic_slice_in_dim(xp, row, rows), *w)
    return tuple(jax.lax.dynamic_update_slice_in_dim(b, o, row, 0)
                 for b, o in zip(bufs, out)), local

  bufs = tuple(jnp.zeros((m + pad, n), x_MD.dtype) for n in (f, f, d))
  (g, u, y), _ = _each_chunk(body, bufs, starts_E, sizes_E, (wg, wu, wd), chunks, ())
  return y[:m], (xp, starts_E, sizes_E, g, u, wg, wu, wd)


def _chunked_swiglu_bwd(chunks, res, dy_MD):
  xp, starts_E, sizes_E, g_buf, u_buf, wg, wu, wd = res
  f32, pad = jnp.float32, max(chunks)
  dyp = jnp.concatenate([dy_MD, jnp.zeros((pad, dy_MD.shape[1]), dy_MD.dtype)])

  def body(dx_buf, acc, row, rows, end, w):
    wg_e, wu_e, wd_e = w
    x, g, u, dy = (jax.lax.dynamic_slice_in_dim(a, row, rows) for a in (xp, g_buf, u_buf, dyp))
    # Rows past the group belong to later experts: a zero cotangent keeps them out of this
    # expert's gradients (and their dx, written here, is written again by their own expert).
    dy = jnp.where((row + jnp.arange(rows) < end)[:, None], dy, 0)
    g, u = g.astype(f32), u.astype(f32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = (dy @ wd_e.T).astype(f32)
    dg = (dh * u * sig * (1 + g * (1 - sig))).astype(x.dtype)
    du = (dh * silu).astype(x.dtype)
    h = (silu * u).astype(x.dtype)
    acc = tuple(a + p.astype(f32) for a, p in zip(acc, (x.T @ dg, x.T @ du, h.T @ dy)))
    dx = dg @ wg_e.T + du @ wu_e.T
    return jax.lax.dynamic_update_slice_in_dim(dx_buf, dx, row, 0), acc

  zeros = tuple(jnp.zeros(w.shape[1:], f32) for w in (wg, wu, wd))
  dx, (dwg, dwu, dwd) = _each_chunk(body, jnp.zeros_like(dyp), starts_E, sizes_E, (wg, wu, wd),
                                    chunks, zeros)
  none = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx[:dy_MD.shape[0]], none(starts_E), none(sizes_E), dwg.astype(wg.dtype),
          dwu.astype(wu.dtype), dwd.astype(wd.dtype))


_chunked_swiglu.defvjp(_chunked_swiglu_fwd, _chunked_swiglu_bwd)


def tiled_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype,
                  tile: int = 128):
  """Exact grouped SwiGLU without a dense lowering: token copies sorted by expert, then a loop
  over the experts that multiplies each group by its expert's weights in chunks of 4 * `tile`
  rows and then `tile` rows (`_chunked_swiglu`). Work is at most N*k + E*tile rows (XLA:CPU
  lowers ragged_dot to a dense product over all E experts, which this avoids). Few tokens (a
  decode step) take another path, chosen from the static shapes: fewer copies than experts, the
  gathered experts (only the routed experts' weights are read); else the slotted product when
  it has fewer rows than the dense one and at most half the chunked bound (its gathers cost
  more than the loop's in a backward); else, when every expert on every token is fewer rows
  than the chunked bound, the dense product."""
  n, k = experts_NK.shape
  e, d, _ = w_gate_EDF.shape
  m = n * k
  cap = slot_capacity(n, k, e)
  chunked = ((m + tile - 1) // tile + e) * tile
  few = None
  if m < e:
    few = gathered_experts
  elif cap < n and 2 * cap * e <= chunked:
    few = functools.partial(slotted_experts, capacity=cap)
  elif n * e <= chunked:
    few = dense_experts
  if few is not None:
    return few(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, dtype=dtype)
  flat = experts_NK.reshape(-1)
  order, inverse = sort_permutation(flat)
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  xs = take_rows(x_ND.astype(dtype), order, inverse, k)
  y = _chunked_swiglu(xs, jnp.cumsum(sizes) - sizes, sizes, w_gate_EDF.astype(dtype),
                      w_up_EDF.astype(dtype), w_down_EFD.astype(dtype), (4 * tile, tile))
  y = take_rows(y, inverse, order, 1).reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights_NK).astype(dtype)


register_moe_impl("ragged", ragged_experts)
register_moe_impl("reference", ragged_experts)
register_moe_impl("tiled", tiled_experts)
register_moe_impl("dense", dense_experts)
register_moe_impl("gathered", gathered_experts)


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std = dtype_of(cfg.param_dtype), cfg.initializer_range
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    # The router stays float32 whatever param_dtype is, as in the reference.
    self.gate = normal_param(rngs, (d, e), ("embed", "router"), std, jnp.float32)
    self.experts_gate_proj = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
    self.experts_up_proj = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
    self.experts_down_proj = normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pd)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(cfg, f * cfg.n_shared_experts, rngs=rngs)
    else:
      self.shared_experts = None

  def __call__(self, x_BTD, segment_ids_BT=None):
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    from coder_jax.parallel.expert import (dropping_enabled, experts_forward, guarded_rows,
                                           route_local)
    # The router fields stay [B, T, ...]: flattening B x T would gather a context-split T
    # (token_dot flattens only an unsplit one).
    logits = token_dot(x_BTD.astype(jnp.float32), self.gate[...])
    r = route_local(jax.vmap(lambda l: route(l, cfg)), logits)
    affinity = jnp.take_along_axis(r.scores_NE, r.experts_NK, axis=-1)
    valid = segment_ids_BT[..., None] > 0 if segment_ids_BT is not None else True
    if segment_ids_BT is not None:  # padding copies are the first to go when over capacity
      affinity = jnp.where(valid, affinity, -jnp.inf)
    if (dropping_enabled() and cfg.capacity_factor is not None
        and cfg.capacity_guard_fraction > 0):
      # +inf affinity: never dropped (the guarded rows' tokens; see guarded_rows)
      rows = jnp.asarray(guarded_rows(x_BTD.shape[0], cfg.capacity_guard_fraction))
      affinity = jnp.where(rows[:, None, None] & valid, jnp.inf, affinity)
    y, kept = experts_forward(cfg, x_BTD, r.experts_NK, r.weights_NK, affinity,
                              self.experts_gate_proj[...], self.experts_up_proj[...],
                              self.experts_down_proj[...], impl=get_moe_impl(cfg.moe_impl),
                              dtype=dt, return_kept=True)
    r = r._replace(kept_NK=kept)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x_BTD)
    return y, r
