"""config.json <-> ModelConfig, in both dialects.

Released DeepSeek checkpoints (remote-code era) write `rope_scaling` + top-level `rope_theta`,
`scoring_func`, `ep_size`, `auto_map`, ...; transformers 5 writes `rope_parameters`. Both load.
Keys that change the computation are mapped or refused with an error naming the key; keys known
not to change it are skipped; anything else is reported in a warning.
"""

from __future__ import annotations

import warnings

from coder_jax.model.config import ConfigError, ModelConfig, YarnConfig

# Same name, same meaning.
_DIRECT = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "topk_method",
    "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
    "moe_layer_freq", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "aux_loss_alpha", "seq_aux", "initializer_range", "bos_token_id", "eos_token_id",
)
# Keys that do not change the forward computation.
_HARMLESS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pad_token_id", "pretraining_tp", "ep_size", "output_router_logits",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "attention_dropout", "head_dim", "qk_head_dim", "num_key_value_heads", "hidden_act",
    "attention_bias", "mlp_bias", "scoring_func", "rope_scaling", "rope_parameters", "rope_theta",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "generation_config", "sep_token_id", "decoder_start_token_id",
}


NORM_TOPK_NOTE = (
    "norm_topk_prob: true: coder_jax follows DeepSeek-V2's definition (top-k weights divided by "
    "their sum, replacing routed_scaling_factor); transformers' DeepseekV2 ignores this flag, so "
    "its logits differ from coder_jax's for this config")


def _refuse(key, value, why):
  raise ConfigError(f"{key}: {value!r} is not supported ({why})")


def _rope_from(d: dict) -> tuple[float, YarnConfig | None]:
  params = d.get("rope_parameters")
  scaling = d.get("rope_scaling")
  if isinstance(params, dict) and params:
    if any(isinstance(v, dict) for v in params.values()):
      _refuse("rope_parameters", params, "per-layer-type RoPE is not used by DeepSeek-V2")
    src, key = params, "rope_parameters"
  else:
    src, key = scaling or {}, "rope_scaling"
  theta = src.get("rope_theta", d.get("rope_theta", 10000.0))
  kind = src.get("rope_type", src.get("type", "default")) if src else "default"
  for where, name in ((d, "partial_rotary_factor"), (src, f"{key}.partial_rotary_factor")):
    if where.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
      _refuse(name, where["partial_rotary_factor"], "MLA rotates the whole qk_rope_head_dim")
  if kind in (None, "default"):
    return float(theta), None
  if kind != "yarn":
    _refuse(f"{key}.rope_type", kind, "only default RoPE and yarn are implemented")
  if src.get("attention_factor") is not None:
    _refuse(f"{key}.attention_factor", src["attention_factor"],
            "DeepSeek derives it from mscale / mscale_all_dim")
  if src.get("factor") is None:
    _refuse(f"{key}.factor", None, "yarn needs an explicit factor")
  yarn = YarnConfig(
      factor=float(src["factor"]),
      original_max_position_embeddings=int(src.get("original_max_position_embeddings")
                                            or d.get("max_position_embeddings", 4096)),
      beta_fast=float(src.get("beta_fast") or 32), beta_slow=float(src.get("beta_slow") or 1),
      mscale=float(src.get("mscale") or 0.0), mscale_all_dim=float(src.get("mscale_all_dim") or 0.0),
      truncate=bool(src.get("truncate", True)))
  return float(theta), yarn


def config_from_hf(d: dict, **runtime) -> ModelConfig:
  """A ModelConfig from a config.json dict; `runtime` sets dtype, attention_impl, ..."""
  if d.get("model_type") != "deepseek_v2":
    raise ConfigError(f"model_type: expected 'deepseek_v2', got {d.get('model_type')!r} "
                      "(this is not a DeepSeek-V2 / Coder-V2 config.json)")
  if d.get("hidden_act", "silu") != "silu":
    _refuse("hidden_act", d["hidden_act"], "DeepSeek-V2 uses silu")
  if d.get("scoring_func", "softmax") != "softmax":
    _refuse("scoring_func", d["scoring_func"], "only softmax routing is DeepSeek-V2's")
  for key in ("attention_bias", "mlp_bias"):
    if d.get(key):
      _refuse(key, d[key], "the released models have no biases")
  if d.get("attention_dropout"):
    _refuse("attention_dropout", d["attention_dropout"], "attention dropout is not implemented")
  kvh = d.get("num_key_value_heads")
  if kvh is not None and kvh != d.get("num_attention_heads"):
    _refuse("num_key_value_heads", kvh, "MLA expands the latent to every head")
  if d.get("pretraining_tp", 1) not in (None, 1):
    _refuse("pretraining_tp", d["pretraining_tp"], "only 1 reproduces the reference")
  theta, yarn = _rope_from(d)
  kw = {k: d[k] for k in _DIRECT if k in d}
  if "topk_method" in kw and kw["topk_method"] is None:
    kw["topk_method"] = "greedy"
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = kw["eos_token_id"][0]
  kw["norm_topk_prob"] = bool(kw.get("norm_topk_prob", False))
  if kw["norm_topk_prob"] and (kw.get("num_experts_per_tok") or 0) > 1:
    warnings.warn(NORM_TOPK_NOTE)
  unknown = sorted(set(d) - set(_DIRECT) - _HARMLESS - {"partial_rotary_factor"})
  if unknown:
    warnings.warn(f"config.json keys not used by coder_jax: {', '.join(unknown)}")
  return ModelConfig(**{**kw, "rope_theta": theta, "rope_scaling": yarn, **runtime})


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
  """A config.json dict in the transformers 5 dialect."""
  if cfg.moe_layer_freq != 1:
    raise ConfigError(f"moe_layer_freq: {cfg.moe_layer_freq} cannot be expressed for "
                      "transformers' DeepseekV2 (every layer from first_k_dense_replace is MoE)")
  if not cfg.has_moe:
    raise ConfigError("n_routed_experts: transformers' DeepseekV2 needs routed experts")
  if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
    warnings.warn(NORM_TOPK_NOTE)
  d = {k: getattr(cfg, k) for k in _DIRECT}
  d["n_shared_experts"] = cfg.n_shared_experts or 0
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  y = cfg.rope_scaling
  if y is not None:
    rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim, "truncate": y.truncate}
  d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
           rope_parameters=rope, hidden_act="silu", num_key_value_heads=cfg.num_attention_heads,
           attention_bias=False, mlp_bias=False, attention_dropout=0.0, dtype=dtype,
           use_cache=True)
  return d
