"""XLA reference for MLA decode attention over the latent KV cache: float32 scores and softmax."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def valid_positions(lengths_B, s: int):
  """[B, S] bool: cache position j of row b holds a real token (j < lengths[b])."""
  return jnp.arange(s, dtype=jnp.int32)[None, :] < lengths_B[:, None]


def reference_latent_decode_attention(q_latent_BHR, q_rope_BHD, latent_cache_BSR, rope_cache_BSD,
                                      lengths_B, *, sm_scale: float, finite_cache: bool = False):
  """o[b, h] = sum_j softmax_j(s[b, h, :]) c[b, j] over j < lengths[b], computed by XLA.

  s[b, h, j] = (q_latent[b, h] . c[b, j] + q_rope[b, h] . k_r[b, j]) * sm_scale. Rows with
  lengths[b] == 0 give zeros. Exact: float32 (HIGHEST) dots and softmax, any dims.
  finite_cache: the caller guarantees that slots past a row's length hold finite values (a
  cache that starts zeroed and is only ever written with computed entries); the cache is then
  read as it is, not first copied with those slots zeroed (a copy of the whole cache at each
  call, which at decode time costs more than the attention).
  """
  f32 = lambda x: x.astype(jnp.float32)
  valid = valid_positions(lengths_B, latent_cache_BSR.shape[1])
  c, k_r = f32(latent_cache_BSR), f32(rope_cache_BSD)
  if not finite_cache:
    # Slots past a row's length may hold anything (stale tokens, NaN); zero them so that a
    # masked probability of 0 times garbage cannot turn into NaN.
    c = jnp.where(valid[:, :, None], c, 0.0)
    k_r = jnp.where(valid[:, :, None], k_r, 0.0)
  hi = lax.Precision.HIGHEST
  s = (jnp.einsum("bhr,bsr->bhs", f32(q_latent_BHR), c, precision=hi)
       + jnp.einsum("bhd,bsd->bhs", f32(q_rope_BHD), k_r, precision=hi)) * sm_scale
  s = jnp.where(valid[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)        # empty rows: all -inf, keep exp() at 0, not NaN
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhs,bsr->bhr", p, c, precision=hi) / jnp.where(l > 0, l, 1.0)
  return o.astype(q_latent_BHR.dtype)
