"""The latent KV cache: per run of identical layers, the normed latent and the rotated rope key.

MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer (576 for the released
models), not the expanded per-head keys and values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from coder_jax.model.config import ModelConfig
from coder_jax.parallel.rules import constrain


class LatentCache(NamedTuple):
  """One buffer per layer (not a stack of layers), so that a decode step writes each layer's
  new entry in place and attention reads the layer's buffer without slicing it out first."""
  latent: tuple    # per layer: [B, S, kv_lora_rank]
  rope: tuple      # per layer: [B, S, qk_rope_head_dim]

  @property
  def max_length(self) -> int:
    return self.latent[0].shape[1]

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

  def layer_pairs(self) -> list:
    """[(latent, rope)] per layer."""
    return list(zip(self.latent, self.rope))


def values_per_token(cfg: ModelConfig) -> int:
  """Cached values per token per layer: kv_lora_rank + qk_rope_head_dim."""
  from coder_jax.model.info import latent_values_per_token
  return latent_values_per_token(cfg)


def cache_bytes_per_token(cfg: ModelConfig, dtype) -> int:
  from coder_jax.model.info import kv_cache_bytes_per_token
  return kv_cache_bytes_per_token(cfg, jnp.dtype(dtype).itemsize)


def _pin(a):
  # Rows follow the batch sharding of the activations; the cached dims stay whole.
  return constrain(a, ("batch", "activation_length", "norm"))


def pin(cache: LatentCache) -> LatentCache:
  """The cache with its rows on the batch axes of the mesh in context (none: unchanged)."""
  return LatentCache(tuple(map(_pin, cache.latent)), tuple(map(_pin, cache.rope)))


def from_prefill(entries, max_length: int, dtype) -> LatentCache:
  """A cache of `max_length` positions holding the prefill's entries at [0, T)."""
  latent, rope = [], []
  for lat, rk in entries:   # per run of layers: [L, B, T, R], [L, B, T, K]
    pad = ((0, 0), (0, max_length - lat.shape[2]), (0, 0))
    for i in range(lat.shape[0]):
      latent.append(_pin(jnp.pad(lat[i].astype(dtype), pad)))
      rope.append(_pin(jnp.pad(rk[i].astype(dtype), pad)))
  return LatentCache(tuple(latent), tuple(rope))


def from_layers(pairs) -> LatentCache:
  """The cache from [(latent, rope)] per layer (what a decode step returns)."""
  return pin(LatentCache(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))
