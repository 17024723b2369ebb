"""Presets, parameter counts (checked two independent ways), KV-cache size, config validation."""

import math

import pytest

from coder_jax.hf.names import tensor_specs
from coder_jax.model import ConfigError, get_config
from coder_jax.model.config import config_from_dict, config_to_dict
from coder_jax.model.info import kv_cache_bytes_per_token, main as info_main, param_counts


def test_lite_preset_matches_released_config():
  c = get_config("coder_v2_lite")
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (27, 2048, 16)
  assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (64, 2, 6)
  assert (c.moe_intermediate_size, c.intermediate_size, c.vocab_size) == (1408, 10944, 102400)
  assert c.q_lora_rank is None and c.kv_lora_rank == 512 and c.qk_head_dim == 192
  assert c.topk_method == "greedy" and c.routed_scaling_factor == 1.0
  y = c.rope_scaling
  assert (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow) == (40, 4096, 32, 1)
  assert (y.mscale, y.mscale_all_dim) == (0.707, 0.707)


def test_236b_preset_matches_released_config():
  c = get_config("coder_v2")
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.q_lora_rank) == (60, 5120, 128, 1536)
  assert (c.n_routed_experts, c.topk_method, c.n_group, c.topk_group) == (160, "group_limited_greedy", 8, 3)
  assert (c.routed_scaling_factor, c.moe_intermediate_size, c.intermediate_size) == (16.0, 1536, 12288)


def test_yarn_softmax_scale():
  # 192^-0.5 * (0.1 * 0.707 * ln 40 + 1)^2
  expected = 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
  assert get_config("coder_v2_lite").softmax_scale() == pytest.approx(expected, rel=1e-12)
  assert get_config("coder_v2_lite").softmax_scale() == pytest.approx(0.1147, abs=1e-4)
  assert get_config("tiny").softmax_scale() == pytest.approx(24 ** -0.5)


@pytest.mark.parametrize("preset,total,active", [("coder_v2_lite", 15.7e9, 2.45e9),
                                                 ("coder_v2", 235.7e9, 20.85e9)])
def test_param_counts(preset, total, active):
  cfg = get_config(preset)
  c = param_counts(cfg)
  assert c["total"] == pytest.approx(total, rel=2e-3)
  assert c["active"] == pytest.approx(active, rel=2e-3)
  # Independent count: the Hub tensors this config has.
  assert c["total"] == sum(math.prod(s.hf_shape) for s in tensor_specs(cfg))


def test_kv_cache_bytes():
  assert kv_cache_bytes_per_token(get_config("coder_v2_lite")) == 576 * 27 * 2
  assert kv_cache_bytes_per_token(get_config("coder_v2"), bytes_per_value=4) == 576 * 60 * 4


def test_info_command_prints_counts(capsys):
  info_main(["--preset", "coder_v2_lite"])
  out = capsys.readouterr().out
  assert "15.71B" in out and "2.45B" in out and "31,104 bytes" in out


def test_config_dict_round_trip():
  c = get_config("coder_v2")
  assert config_from_dict(config_to_dict(c)) == c


@pytest.mark.parametrize("overrides,field", [
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(topk_method="group_limited_greedy", n_group=3), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=5), "topk_group"),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=3),
     "num_experts_per_tok"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_scaling=dict(factor=0.5)), "rope_scaling.factor"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_invalid_configs_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=f"^{field}:"):
    get_config("tiny", **overrides)


def test_unknown_preset_and_field():
  with pytest.raises(ConfigError, match="unknown preset 'huge'"):
    get_config("huge")
  with pytest.raises(ConfigError, match="^hiden_size: not a ModelConfig field"):
    get_config("tiny", hiden_size=3)


def test_moe_layer_freq_layout():
  c = get_config("tiny", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
  assert c.layer_kinds() == ("dense", "dense", "moe", "dense", "moe", "dense")
  assert get_config("tiny", n_routed_experts=None).layer_kinds() == ("dense",) * 3
