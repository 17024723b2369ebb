"""XLA reference for MLA attention: float32 logits and softmax, any Dqk / Dv."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_segment_ids_BT, kv_segment_ids_BS, causal: bool):
  """[B, T, S] bool: equal segment ids and, if causal, key index <= query index."""
  mask = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if causal:
    t, s = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    mask = mask & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None]
  return mask


def reference_attention(q_BTHK, k_BSHK, v_BSHV, *, segment_ids=None, causal: bool = True,
                        sm_scale: float | None = None):
  """softmax(q k^T * sm_scale, masked) v, computed by XLA; [B, T, H, Dv] in v's dtype.

  With S > T keys the queries are the last T positions of the keys' sequence; segment_ids is
  then [B, S] and the queries' ids are its last T."""
  b, t = q_BTHK.shape[:2]
  s = k_BSHK.shape[1]
  if sm_scale is None:
    sm_scale = q_BTHK.shape[-1] ** -0.5
  if segment_ids is None:
    q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
  else:
    q_seg, kv_seg = segment_ids[:, s - t:], segment_ids
  logits = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                      preferred_element_type=jnp.float32) * sm_scale
  mask = attention_mask(q_seg, kv_seg, causal)
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSHV.dtype)
  return jnp.einsum("bhts,bshv->bthv", probs, v_BSHV,
                    preferred_element_type=jnp.float32).astype(v_BSHV.dtype)
