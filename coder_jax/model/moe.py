"""DeepSeekMoE: float32 softmax router, greedy / group-limited top-k, routed + shared experts.

An expert implementation is any function with the signature of `ragged_experts`; register it with
`register_moe_impl(name, fn)` and pick it with `ModelConfig.moe_impl`.
"""

from __future__ import annotations

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


def sorted_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype,
                   matmul=jax.lax.ragged_dot):
  """Sort token copies by expert, run each expert's SwiGLU with a grouped matmul
  `matmul(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]`, unsort and combine."""
  n, k = experts_NK.shape
  e = w_gate_EDF.shape[0]
  flat = experts_NK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  # The inverse permutation turns the unsort into a gather (GPU scatters are slow).
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  xs = x_ND.astype(dtype)[order // k]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  g = matmul(xs, w_gate_EDF.astype(dtype), sizes)
  u = matmul(xs, w_up_EDF.astype(dtype), sizes)
  y = matmul(jax.nn.silu(g) * u, w_down_EFD.astype(dtype), sizes)
  y = y[inverse].reshape(n, k, -1)
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


def _swiglu_tile(x_RD, wg_DF, wu_DF, wd_FD):
  g, u = x_RD @ wg_DF, x_RD @ wu_DF
  return g, u, (jax.nn.silu(g) * u) @ wd_FD


@jax.custom_vjp
def _tile_swiglu(x_TRD, expert_T, used, w_gate_EDF, w_up_EDF, w_down_EFD):
  """y[t] = SwiGLU of tile x[t] with expert expert_T[t]'s weights, one `lax.scan` step per tile;
  tiles from `used` on are empty (zeros out, no work). The gradient is written by hand: JAX's
  own transpose of the scan stacks one weight-sized cotangent per tile ([tiles, D, F], then
  summed per expert); this one adds each tile's into its expert's slot of a float32 carry."""
  return _tile_swiglu_fwd(x_TRD, expert_T, used, w_gate_EDF, w_up_EDF, w_down_EFD)[0]


def _tile_swiglu_fwd(x_TRD, expert_T, used, wg, wu, wd):
  t, r, _ = x_TRD.shape
  f = wg.shape[-1]

  def body(_, inp):
    i, x, e = inp
    return None, jax.lax.cond(
        i < used, lambda: _swiglu_tile(x, wg[e], wu[e], wd[e]),
        lambda: (jnp.zeros((r, f), x.dtype), jnp.zeros((r, f), x.dtype), jnp.zeros_like(x)))

  _, (g, u, y) = jax.lax.scan(body, None, (jnp.arange(t), x_TRD, expert_T))
  return y, (x_TRD, expert_T, used, g, u, wg, wu, wd)


def _tile_swiglu_bwd(res, dy_TRD):
  x_TRD, expert_T, used, g_TRF, u_TRF, wg, wu, wd = res
  f32 = jnp.float32

  def add(acc, e, v):
    row = jax.lax.dynamic_index_in_dim(acc, e, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(acc, row + v.astype(f32), e, 0)

  def tile(x, e, g, u, dy):
    sig = jax.nn.sigmoid(g.astype(f32))
    silu = g.astype(f32) * sig
    dh = (dy @ wd[e].T).astype(f32)
    dg = (dh * u.astype(f32) * sig * (1 + g.astype(f32) * (1 - sig))).astype(x.dtype)
    du = (dh * silu).astype(x.dtype)
    h = (silu * u.astype(f32)).astype(x.dtype)
    return (x.T @ dg, x.T @ du, h.T @ dy), dg @ wg[e].T + du @ wu[e].T

  def skip(x, e, g, u, dy):
    return tuple(jnp.zeros(w.shape[1:], f32) for w in (wg, wu, wd)), jnp.zeros_like(x)

  def body(c, inp):
    # The accumulators stay out of the cond: passed through a conditional, XLA:CPU copied
    # all three (weight-sized) at every tile.
    i, x, e, g, u, dy = inp
    parts, dx = jax.lax.cond(i < used, tile, skip, x, e, g, u, dy)
    return tuple(add(acc, e, p) for acc, p in zip(c, parts)), dx

  zeros = tuple(jnp.zeros(w.shape, f32) for w in (wg, wu, wd))
  (dwg, dwu, dwd), dx = jax.lax.scan(
      body, zeros, (jnp.arange(x_TRD.shape[0]), x_TRD, expert_T, g_TRF, u_TRF, dy_TRD))
  none = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx, none(expert_T), none(used), dwg.astype(wg.dtype), dwu.astype(wu.dtype),
          dwd.astype(wd.dtype))


_tile_swiglu.defvjp(_tile_swiglu_fwd, _tile_swiglu_bwd)


def tiled_experts(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, *, dtype,
                  tile: int = 128):
  """Exact grouped SwiGLU without a dense lowering: token copies sorted by expert, each group
  padded to whole tiles of `tile` rows, then one `lax.scan` step per tile multiplies the tile by
  its single expert's weights (tiles past the last group's are skipped). Work is about N*k +
  E*tile/2 rows (XLA:CPU lowers ragged_dot to a dense product over all E experts, which this
  avoids). Few tokens (a decode step) take another path, chosen from the static shapes: fewer
  copies than experts, the gathered experts (only the routed experts' weights are read); else,
  when every expert on every token is fewer rows than the tiled bound, the dense product."""
  n, k = experts_NK.shape
  e, d, _ = w_gate_EDF.shape
  m = n * k
  few = None
  if m < e:
    few = gathered_experts
  elif n * e <= ((m + tile - 1) // tile + e) * tile:
    few = dense_experts
  if few is not None:
    return few(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD, dtype=dtype)
  flat = experts_NK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=e)
  padded = (sizes + tile - 1) // tile * tile
  starts = jnp.cumsum(sizes) - sizes
  pstarts = jnp.cumsum(padded) - padded
  num_tiles = (m + tile - 1) // tile + e       # static bound on sum(padded) / tile (as above)
  sorted_e = flat[order]
  dest = pstarts[sorted_e] + jnp.arange(m) - starts[sorted_e]
  xpad = jnp.zeros((num_tiles * tile, d), dtype).at[dest].set(x_ND.astype(dtype)[order // k])
  tile_start = jnp.arange(num_tiles) * tile
  tile_expert = jnp.clip(jnp.searchsorted(pstarts + padded, tile_start, side="right"), 0, e - 1)
  y = _tile_swiglu(xpad.reshape(num_tiles, tile, d), tile_expert, jnp.sum(padded) // tile,
                   w_gate_EDF.astype(dtype), w_up_EDF.astype(dtype), w_down_EFD.astype(dtype))
  y = y.reshape(num_tiles * tile, d)[dest]
  y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, d)
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
