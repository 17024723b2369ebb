"""Multi-head Latent Attention (DeepSeek-V2) and the swappable attention kernel.

An attention implementation is any function with the signature of `xla_attention`; register it
with `register_attention_impl(name, fn)` and pick it with `ModelConfig.attention_impl`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from coder_jax.model.config import ModelConfig
from coder_jax.model.layers import RMSNorm, dtype_of, normal_param, token_dot
from coder_jax.model.registry import ImplRegistry
from coder_jax.model.rope import apply_rope
from coder_jax.parallel.rules import context_size, unsplit_context

# The reference (and the released checkpoints) use the RMSNorm default eps for the two low-rank
# norms, not config.rms_norm_eps.
LORA_NORM_EPS = 1e-6

_ATTENTION_IMPLS = ImplRegistry("attention_impl")
register_attention_impl = _ATTENTION_IMPLS.register
get_attention_impl = _ATTENTION_IMPLS.get


def attention_mask(q_segment_ids_BT, kv_segment_ids_BS, causal: bool = True):
  """[B, T, S] bool: same segment and (if causal) key index <= query index, right-aligned."""
  mask = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if causal:
    t, s = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    q_idx = jnp.arange(t)[:, None] + (s - t)
    mask = mask & (jnp.arange(s)[None, :] <= q_idx)[None]
  return mask


def xla_attention(q_BTHK, k_BSHK, v_BSHV, *, q_segment_ids_BT, kv_segment_ids_BS, scale: float,
                  causal: bool = True):
  """Plain softmax attention in float32 logits; the reference every kernel is tested against.
  Heads move in front of the length first: with [B, T, H, ...] operands XLA:CPU wrote the
  probabilities-times-values product as [B, H, V, T] and ran it at a quarter of the speed
  (3.5x the forward of 8 x 256 tokens, 8 heads)."""
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BTHK, k_BSHK, v_BSHV))
  logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_segment_ids_BT, kv_segment_ids_BS, causal)
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhts,bhsv->bhtv", probs, v, preferred_element_type=jnp.float32)
  return jnp.swapaxes(out, 1, 2).astype(v_BSHV.dtype)


register_attention_impl("xla", xla_attention)
register_attention_impl("reference", xla_attention)


class MLAttention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std = dtype_of(cfg.param_dtype), cfg.initializer_range
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
      self.q_proj = normal_param(rngs, (d, h, cfg.qk_head_dim), ("embed", "heads", "qk_head"), std, pd)
    else:
      r = cfg.q_lora_rank
      self.q_a_proj = normal_param(rngs, (d, r), ("embed", "q_lora"), std, pd)
      self.q_a_layernorm = RMSNorm(r, LORA_NORM_EPS, pd, "q_lora")
      self.q_b_proj = normal_param(rngs, (r, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"),
                                   std, pd)
    r = cfg.kv_lora_rank
    self.kv_a_proj_with_mqa = normal_param(rngs, (d, r + cfg.qk_rope_head_dim),
                                           ("embed", "kv_lora"), std, pd)
    self.kv_a_layernorm = RMSNorm(r, LORA_NORM_EPS, pd, "kv_lora")
    self.kv_b_proj = normal_param(rngs, (r, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                  ("kv_lora", "heads", "kv_head"), std, pd)
    self.o_proj = normal_param(rngs, (h, cfg.v_head_dim, d), ("heads", "v_head", "embed"), std, pd)

  def queries(self, x_BTD, cos, sin):
    """[B, T, H, qk_head_dim] with the rope part rotated."""
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    x = x_BTD.astype(dt)
    if cfg.q_lora_rank is None:
      q = token_dot(x, self.q_proj[...].astype(dt))
    else:
      qa = self.q_a_layernorm(token_dot(x, self.q_a_proj[...].astype(dt)))
      q = token_dot(qa, self.q_b_proj[...].astype(dt))
    n = cfg.qk_nope_head_dim
    return jnp.concatenate([q[..., :n], apply_rope(q[..., n:], cos, sin)], axis=-1)

  def latents(self, x_BTD, cos, sin):
    """The per-token cache entry: (normed latent [B, T, kv_lora_rank], rotated key [B, T, rope])."""
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    ckv = token_dot(x_BTD.astype(dt), self.kv_a_proj_with_mqa[...].astype(dt))
    r = cfg.kv_lora_rank
    return self.kv_a_layernorm(ckv[..., :r]), apply_rope(ckv[..., r:], cos, sin)

  def expand(self, latent_BSR, k_rope_BSK):
    """Latents -> per-head keys [B, S, H, qk_head_dim] and values [B, S, H, v_head_dim]."""
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    kv = token_dot(latent_BSR, self.kv_b_proj[...].astype(dt))
    n = cfg.qk_nope_head_dim
    k_nope, v = kv[..., :n], kv[..., n:]
    k_rope = jnp.broadcast_to(k_rope_BSK[:, :, None, :], k_nope.shape[:3] + k_rope_BSK.shape[-1:])
    return jnp.concatenate([k_nope, k_rope], axis=-1), v

  def __call__(self, x_BTD, cos, sin, segment_ids_BT, return_cache: bool = False, prefix=None):
    """Attention output [B, T, D]; with return_cache also the cache entries (latent, rope key).

    prefix: (latent [P, S, R], rope key [P, S, K], segment ids [P, S], g) of tokens that come
    before these in every row, shared by runs of g rows (B = P g): the queries also attend to
    them, as if each row were its run's prefix followed by its own tokens."""
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    q = self.queries(x_BTD, cos, sin)
    latent, k_rope = self.latents(x_BTD, cos, sin)
    attn = get_attention_impl(cfg.attention_impl)
    if unsplit_context() > 1:   # sequence split over `context`: gather latents, not K/V
      from coder_jax.model.context import context_attention
      out = context_attention(cfg, q, latent, k_rope, segment_ids_BT,
                              self.kv_b_proj[...].astype(dt), attn)
    else:
      kv_latent, kv_rope, kv_segment_ids = latent, k_rope, segment_ids_BT
      if prefix is not None:
        p_latent, p_rope, p_segment_ids, g = prefix
        cat = lambda a, b: jnp.concatenate([jnp.repeat(a, g, axis=0).astype(b.dtype), b], 1)
        kv_latent, kv_rope = cat(p_latent, latent), cat(p_rope, k_rope)
        kv_segment_ids = cat(p_segment_ids, segment_ids_BT)
      k, v = self.expand(kv_latent, kv_rope)
      # Queries shorter than keys are the keys' last positions (causal, right-aligned).
      out = attn(q, k, v, q_segment_ids_BT=segment_ids_BT, kv_segment_ids_BS=kv_segment_ids,
                 scale=cfg.softmax_scale(), causal=True)
    out = checkpoint_name(out, "attn_out")
    out = token_dot(out.astype(dt), self.o_proj[...].astype(dt), contract=2)
    return (out, (latent, k_rope)) if return_cache else out

  def decode(self, x_B1D, cos, sin, cache_latent_BSR, cache_rope_BSK, positions_B, attend):
    """One new token per row at `positions_B`, attending to cache entries [0, position].

    kv_b_proj is absorbed (DeepSeek-V2's inference form): the query's nope part is mapped into
    the latent space and the output comes back through the value half of kv_b_proj, so the
    cache holds only the latent and the rope key. `attend(q_latent [B, H, R], q_rope [B, H, K],
    latent [B, S, R], rope [B, S, K], lengths [B], sm_scale) -> [B, H, R]`.
    Returns (output [B, 1, D], the caches with the new token's entries written at
    `positions_B`): written in place when the caches are buffers the caller gives up (a
    loop carry, donated arguments), so a step copies nothing of the cache.
    """
    cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
    if context_size() > 1:
      raise ValueError(f"decoding runs on a mesh whose context axis is 1; this mesh has "
                       f"context={context_size()} (build the sampling mesh without it)")
    q = self.queries(x_B1D, cos, sin)[:, 0]
    latent, k_rope = (a[:, 0] for a in self.latents(x_B1D, cos, sin))
    rows = jnp.arange(x_B1D.shape[0])
    cache_latent_BSR = cache_latent_BSR.at[rows, positions_B].set(latent.astype(cache_latent_BSR.dtype))
    cache_rope_BSK = cache_rope_BSK.at[rows, positions_B].set(k_rope.astype(cache_rope_BSK.dtype))
    n = cfg.qk_nope_head_dim
    w = self.kv_b_proj[...].astype(dt)
    q_latent = jnp.einsum("bhn,rhn->bhr", q[..., :n], w[..., :n])
    o_latent = attend(q_latent, q[..., n:], cache_latent_BSR, cache_rope_BSK, positions_B + 1,
                      cfg.softmax_scale())
    out = jnp.einsum("bhr,rhv->bhv", o_latent.astype(dt), w[..., n:])
    out = jnp.einsum("bhv,hvd->bd", out, self.o_proj[...].astype(dt))
    return out[:, None], (cache_latent_BSR, cache_rope_BSK)
