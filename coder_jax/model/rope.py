"""Rotary position embedding on the decoupled rope part of MLA, with YaRN.

The checkpoints rotate adjacent pairs (2i, 2i+1). A dot product does not care how both of its
operands are permuted, so `apply_rope` returns the rotated pairs as [evens | odds]: no interleave
on the way out, and q and k (and the latent cache) all use that one layout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from coder_jax.model.config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """(inv_freq [dim/2] float32, cos/sin scale), computed in float32 like the reference."""
  dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
  pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrap = (1.0 / pos_freqs).astype(np.float32)
  y = cfg.rope_scaling
  if y is None:
    return extrap, 1.0
  interp = (1.0 / (np.float32(y.factor) * pos_freqs)).astype(np.float32)
  orig = y.original_max_position_embeddings
  low = _correction_dim(y.beta_fast, dim, base, orig)
  high = _correction_dim(y.beta_slow, dim, base, orig)
  if y.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  extrap_weight = 1 - ramp
  inv_freq = interp * (1 - extrap_weight) + extrap * extrap_weight
  if y.mscale and y.mscale_all_dim:
    attn_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
  else:
    attn_factor = yarn_mscale(y.factor)
  return inv_freq.astype(np.float32), float(attn_factor)


def rope_tables(cfg: ModelConfig, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin of shape [B, T, dim/2] in float32, already multiplied by the YaRN cos/sin scale."""
  inv_freq, scale = inv_frequencies(cfg)
  angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


@functools.cache
def _deinterleave(dim: int) -> np.ndarray:
  """[dim, dim] 0/1 matrix taking a vector with pairs (2i, 2i+1) to [evens | odds]."""
  m = np.zeros((dim, dim), np.float32)
  half = np.arange(dim // 2)
  m[2 * half, half] = 1.0
  m[2 * half + 1, dim // 2 + half] = 1.0
  return m


def apply_rope(x: jnp.ndarray, cos_BTK: jnp.ndarray, sin_BTK: jnp.ndarray) -> jnp.ndarray:
  """x [B, T, (H,) dim] with pairs (2i, 2i+1) -> rotated, laid out [evens | odds], x's dtype."""
  # The pairs are split by a 0/1 matmul rather than strided slices (x[..., 0::2]): the slices'
  # backward is a pad with interior padding, which the TPU compiler took ~4 minutes each to
  # build inside Lite's 32K train step, into 67 MiB more code a chip (benchmarks/RESULTS.md).
  # Every output is one input times 1 plus zeros: exact at HIGHEST precision, bf16 or float32.
  d = x.shape[-1]
  split = jnp.einsum("...d,de->...e", x, jnp.asarray(_deinterleave(d), x.dtype),
                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  even, odd = split[..., :d // 2], split[..., d // 2:]
  if x.ndim == 4:  # per-head: broadcast over H
    cos_BTK, sin_BTK = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
  out = jnp.concatenate([even * cos_BTK - odd * sin_BTK, even * sin_BTK + odd * cos_BTK], axis=-1)
  return out.astype(x.dtype)
