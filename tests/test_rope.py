"""RoPE / YaRN frequencies against transformers' own computation and a float64 transcription."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import DeepseekV2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from coder_jax.model import get_config
from coder_jax.model.config import YarnConfig
from coder_jax.model.rope import apply_rope, inv_frequencies


def _float64_yarn(dim, base, factor, orig, beta_fast, beta_slow):
  idx = np.arange(0, dim, 2) / dim
  extrap = 1 / base ** idx
  corr = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))
  low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return extrap / factor * ramp + extrap * (1 - ramp)


@pytest.mark.parametrize("dim,factor,orig", [(64, 40.0, 4096), (8, 8.0, 32), (16, 4.0, 2048)])
def test_yarn_frequencies(dim, factor, orig):
  y = YarnConfig(factor=factor, original_max_position_embeddings=orig)
  cfg = get_config("tiny", qk_rope_head_dim=dim, rope_scaling=y)
  inv, scale = inv_frequencies(cfg)
  np.testing.assert_allclose(inv, _float64_yarn(dim, 10000.0, factor, orig, 32, 1), rtol=1e-6)
  assert scale == 1.0  # mscale == mscale_all_dim
  hf_cfg = DeepseekV2Config(qk_rope_head_dim=dim, max_position_embeddings=orig * int(factor),
                            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0,
                                                 factor=factor, original_max_position_embeddings=orig,
                                                 beta_fast=32, beta_slow=1, mscale=0.707,
                                                 mscale_all_dim=0.707))
  hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
  np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6)
  assert scale == pytest.approx(hf_scale)


def test_yarn_attention_factor_when_mscales_differ():
  cfg = get_config("tiny", rope_scaling=YarnConfig(factor=16.0, mscale=1.0, mscale_all_dim=0.5))
  _, scale = inv_frequencies(cfg)
  assert scale == pytest.approx((0.1 * math.log(16) + 1) / (0.05 * math.log(16) + 1))


def test_plain_rope_frequencies():
  inv, scale = inv_frequencies(get_config("tiny", rope_theta=500.0))
  np.testing.assert_allclose(inv, 1 / 500.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
  assert scale == 1.0


def test_apply_rope_rotates_adjacent_pairs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 3, 6)).astype(np.float32)
  ang = rng.normal(size=(1, 3, 3)).astype(np.float32)
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.cos(ang), jnp.sin(ang)))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)  # pairs (2i, 2i+1) as complex numbers
  np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-6)
