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
  latent: tuple    # per run: [layers, B, S, kv_lora_rank]
  rope: tuple      # per run: [layers, B, S, qk_rope_head_dim]

  @property
  def max_length(self) -> int:
    return self.latent[0].shape[2]

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))


def values_per_token(cfg: ModelConfig) -> int:
  """Cached values per token per layer: kv_lora_rank + qk_rope_head_dim."""
  return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype) -> int:
  from coder_jax.model.info import kv_cache_bytes_per_token
  return kv_cache_bytes_per_token(cfg, jnp.dtype(dtype).itemsize)


def _pin(a):
  # Rows follow the batch sharding of the activations; the cached dims stay whole.
  return constrain(a, ("layers", "batch", "activation_length", "norm"))


def pin(cache: LatentCache) -> LatentCache:
  """The cache with its rows on the batch axes of the mesh in context (none: unchanged)."""
  return LatentCache(tuple(map(_pin, cache.latent)), tuple(map(_pin, cache.rope)))


def from_prefill(entries, max_length: int, dtype) -> LatentCache:
  """A cache of `max_length` positions holding the prefill's entries at [0, T)."""
  latent, rope = [], []
  for lat, rk in entries:   # per run: [L, B, T, R], [L, B, T, K]
    pad = ((0, 0), (0, 0), (0, max_length - lat.shape[2]), (0, 0))
    latent.append(_pin(jnp.pad(lat.astype(dtype), pad)))
    rope.append(_pin(jnp.pad(rk.astype(dtype), pad)))
  return LatentCache(tuple(latent), tuple(rope))


def write(cache: LatentCache, new_entries, positions_B) -> LatentCache:
  """Stores each run's new token entries ([L, B, R], [L, B, K]) at the rows' positions."""
  rows = jnp.arange(positions_B.shape[0])
  latent = tuple(_pin(c.at[:, rows, positions_B].set(n.astype(c.dtype)))
                 for c, (n, _) in zip(cache.latent, new_entries))
  rope = tuple(_pin(c.at[:, rows, positions_B].set(n.astype(c.dtype)))
               for c, (_, n) in zip(cache.rope, new_entries))
  return LatentCache(latent, rope)
