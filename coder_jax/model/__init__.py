"""DeepSeek-V2 / Coder-V2 model: config, presets and NNX modules (jax, flax, numpy, gin only)."""

from coder_jax.model.attention import get_attention_impl, register_attention_impl, xla_attention
from coder_jax.model.config import (ConfigError, ModelConfig, PRESETS, YarnConfig, get_config)
from coder_jax.model.decoder import DeepseekV2, init_model, segment_positions
from coder_jax.model.moe import get_moe_impl, register_moe_impl, route
from coder_jax.model import kernels as _kernels  # registers pallas / tokamax / auto impls

__all__ = [
    "ConfigError", "DeepseekV2", "ModelConfig", "PRESETS", "YarnConfig", "get_attention_impl",
    "get_config", "get_moe_impl", "init_model", "register_attention_impl", "register_moe_impl",
    "route", "segment_positions", "xla_attention",
]
