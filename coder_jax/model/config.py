"""Model configuration for DeepSeek-V2 / DeepSeek-Coder-V2, its presets and its validation.

Every field of transformers' `DeepseekV2Config` that changes the computation has a field here with
the same name, so a config.json maps onto it one to one (see `coder_jax.hf` for both dialects).
Fields after `# -- runtime` only choose how the same function is computed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin

TOPK_METHODS = ("greedy", "group_limited_greedy")
CAPACITY_RULES = ("device", "pair")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")


class ConfigError(ValueError):
  """A config value this implementation does not compute (or that is inconsistent)."""


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.707
  mscale_all_dim: float = 0.707
  # transformers' default: snap the correction range to whole dimensions.
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 102400
  hidden_size: int = 2048
  intermediate_size: int = 10944
  moe_intermediate_size: int = 1408
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  q_lora_rank: int | None = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int | None = 64
  n_shared_experts: int | None = 2
  num_experts_per_tok: int | None = 6
  topk_method: str = "greedy"
  n_group: int | None = 1
  topk_group: int | None = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  first_k_dense_replace: int = 1
  moe_layer_freq: int = 1
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: YarnConfig | None = YarnConfig()
  max_position_embeddings: int = 163840
  tie_word_embeddings: bool = False
  aux_loss_alpha: float = 0.001
  seq_aux: bool = True
  initializer_range: float = 0.02
  bos_token_id: int | None = 100000
  eos_token_id: int | None = 100001
  # -- training-time routing (not in config.json; DeepSeek-V2 section 2.2.2/2.2.3)
  # Experts form `routing_devices` contiguous groups (the devices of the expert axis); with
  # `routing_device_limit` = M a token's experts come from at most M groups. The device-level
  # and communication balance losses are computed over the same groups.
  routing_devices: int = 1
  routing_device_limit: int | None = None
  # Token dropping while training (None: dropless). capacity_rule "device" (DeepSeek-V2): each
  # expert-parallel device computes at most ceil(capacity_factor x average load) copies, dropping
  # its lowest-affinity ones; "pair": each device sends at most ceil(capacity_factor x copies / D)
  # to each device (fixed buffers, no exchange of affinities, drops more under uneven routing).
  # Copies of a capacity_guard_fraction of the rows (about that share of the sequences) are
  # never dropped (parallel/expert.py says which rows).
  capacity_factor: float | None = None
  capacity_rule: str = "device"
  capacity_guard_fraction: float = 0.1
  # -- runtime: how the same function is computed
  dtype: str = "float32"          # activations / matmul inputs
  param_dtype: str = "float32"    # stored weights (the router is always float32)
  # None: a lax.scan over the layers, except when compiling for the CPU, where they are
  # unrolled (XLA:CPU copies each layer's slice of the stacked weights and residuals).
  scan_layers: bool | None = None
  remat_policy: str = "none"
  attention_impl: str = "auto"   # see coder_jax/model/kernels.py
  moe_impl: str = "auto"
  # Expert-parallel buffers per round: this many times the balanced load (parallel/dispatch.py);
  # copies beyond it go in further rounds, never dropped. None: room for the worst case, one round.
  dispatch_headroom: float | None = 2.0

  def __post_init__(self):
    validate(self)

  # -- derived quantities
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def has_moe(self) -> bool:
    return bool(self.n_routed_experts)

  def is_moe_layer(self, i: int) -> bool:
    return (self.has_moe and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0)

  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

  def softmax_scale(self) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as transformers)."""
    scale = self.qk_head_dim ** -0.5
    y = self.rope_scaling
    if y is not None and y.mscale_all_dim:
      m = yarn_mscale(y.factor, y.mscale_all_dim)
      scale *= m * m
    return scale

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _need(cond: bool, field: str, msg: str):
  if not cond:
    raise ConfigError(f"{field}: {msg}")


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(c: ModelConfig) -> None:
  for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    v = getattr(c, f)
    _need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
  _need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
        f"must be even (RoPE rotates pairs), got {c.qk_rope_head_dim}")
  _need(c.q_lora_rank is None or (isinstance(c.q_lora_rank, int) and c.q_lora_rank > 0),
        "q_lora_rank", f"must be null or a positive integer, got {c.q_lora_rank!r}")
  _need(c.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {c.rms_norm_eps}")
  _need(c.rope_theta > 0, "rope_theta", f"must be > 0, got {c.rope_theta}")
  _need(c.moe_layer_freq >= 1, "moe_layer_freq", f"must be >= 1, got {c.moe_layer_freq}")
  _need(c.first_k_dense_replace >= 0, "first_k_dense_replace",
        f"must be >= 0, got {c.first_k_dense_replace}")
  dense_needed = not c.has_moe or c.first_k_dense_replace > 0 or c.moe_layer_freq > 1
  if dense_needed:
    _need(c.intermediate_size > 0, "intermediate_size",
          f"must be > 0 when dense layers exist, got {c.intermediate_size}")
  if c.has_moe:
    e = c.n_routed_experts
    _need(isinstance(e, int) and e > 0, "n_routed_experts", f"must be a positive integer, got {e!r}")
    _need(c.moe_intermediate_size > 0, "moe_intermediate_size",
          f"must be > 0, got {c.moe_intermediate_size}")
    k = c.num_experts_per_tok
    _need(isinstance(k, int) and 1 <= k <= e, "num_experts_per_tok",
          f"must be in [1, n_routed_experts={e}], got {k!r}")
    _need(c.n_shared_experts is None or c.n_shared_experts >= 0, "n_shared_experts",
          f"must be null or >= 0, got {c.n_shared_experts}")
    _need(c.topk_method in TOPK_METHODS, "topk_method",
          f"{c.topk_method!r} is not supported; supported: {', '.join(TOPK_METHODS)} "
          "(noaux_tc / sigmoid scoring belong to DeepSeek-V3)")
    if c.topk_method == "group_limited_greedy":
      g, tg = c.n_group, c.topk_group
      _need(isinstance(g, int) and g >= 1 and e % g == 0, "n_group",
            f"must divide n_routed_experts={e}, got {g!r}")
      _need(isinstance(tg, int) and 1 <= tg <= g, "topk_group",
            f"must be in [1, n_group={g}], got {tg!r}")
      _need(k <= tg * (e // g), "num_experts_per_tok",
            f"{k} experts cannot be chosen from topk_group={tg} groups of {e // g}")
  if c.has_moe:
    d = c.routing_devices
    _need(isinstance(d, int) and d >= 1 and c.n_routed_experts % d == 0, "routing_devices",
          f"must divide n_routed_experts={c.n_routed_experts}, got {d!r}")
    m = c.routing_device_limit
    if m is not None:
      _need(isinstance(m, int) and 1 <= m <= d, "routing_device_limit",
            f"must be null or in [1, routing_devices={d}], got {m!r}")
      _need(c.num_experts_per_tok <= m * (c.n_routed_experts // d), "routing_device_limit",
            f"{c.num_experts_per_tok} experts cannot be chosen from {m} devices of "
            f"{c.n_routed_experts // d}")
      if c.topk_method == "group_limited_greedy":
        # Both filters apply: bound the experts left in the worst case.
        g, tg = c.n_group, c.topk_group
        _need(g % d == 0 or d % g == 0, "routing_device_limit",
              f"with group-limited routing, n_group={g} and routing_devices={d} must nest "
              "(one must divide the other)")
        left = (min(m, tg) * (c.n_routed_experts // g) if g % d == 0
                else min(m, tg * (d // g)) * (c.n_routed_experts // d))
        _need(c.num_experts_per_tok <= left, "routing_device_limit",
              f"{c.num_experts_per_tok} experts cannot be chosen when topk_group={tg} of "
              f"n_group={g} and {m} of routing_devices={d} leave only {left} in the worst case")
  _need(c.capacity_factor is None or (_number(c.capacity_factor) and c.capacity_factor > 0),
        "capacity_factor", f"must be null (dropless) or > 0, got {c.capacity_factor!r}")
  _need(c.capacity_rule in CAPACITY_RULES, "capacity_rule",
        f"{c.capacity_rule!r} is not one of {CAPACITY_RULES}")
  _need(_number(c.capacity_guard_fraction) and 0 <= c.capacity_guard_fraction <= 1,
        "capacity_guard_fraction", f"must be in [0, 1], got {c.capacity_guard_fraction!r}")
  _need(c.dispatch_headroom is None or (_number(c.dispatch_headroom)
                                        and c.dispatch_headroom >= 1),
        "dispatch_headroom", f"must be null (worst-case buffers) or >= 1 (times the balanced "
        f"load), got {c.dispatch_headroom!r}")
  y = c.rope_scaling
  if y is not None:
    _need(isinstance(y, YarnConfig), "rope_scaling", f"must be a YarnConfig or null, got {y!r}")
    _need(y.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {y.factor}")
    _need(y.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
          f"must be > 0, got {y.original_max_position_embeddings}")
  _need(c.remat_policy in REMAT_POLICIES, "remat_policy",
        f"{c.remat_policy!r} is not one of {REMAT_POLICIES}")
  for f in ("dtype", "param_dtype"):
    _need(getattr(c, f) in ("float32", "bfloat16", "float16"), f,
          f"must be float32, bfloat16 or float16, got {getattr(c, f)!r}")


# ---------------------------------------------------------------------------- presets
# Public values of the released checkpoints' config.json (DeepSeek-Coder-V2-Lite-Base and
# DeepSeek-Coder-V2-Base); `tiny` is for tests.

PRESETS: dict[str, dict[str, Any]] = {
    "coder_v2_lite": dict(),
    "coder_v2": dict(
        hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        topk_method="group_limited_greedy", n_group=8, topk_group=3,
        routed_scaling_factor=16.0),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        rope_scaling=None, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
}


def _coerce_rope_scaling(v):
  if isinstance(v, dict):
    return YarnConfig(**v)
  return v


@gin.configurable("model_config")
def get_config(preset: str = "tiny", **overrides) -> ModelConfig:
  """A preset by name with fields overridden (gin: `model_config.preset = 'coder_v2_lite'`)."""
  if preset not in PRESETS:
    raise ConfigError(f"preset: unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"{unknown[0]}: not a ModelConfig field")
  kw = {**PRESETS[preset], **overrides}
  if "rope_scaling" in kw:
    kw["rope_scaling"] = _coerce_rope_scaling(kw["rope_scaling"])
  return ModelConfig(**kw)


# Fields that choose how the same function is computed, or only how fresh weights are drawn: a
# run may resume with other values. Any other difference changes what is trained.
NON_COMPUTATION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                          "moe_impl", "dispatch_headroom", "initializer_range", "bos_token_id",
                          "eos_token_id", "aux_loss_alpha", "seq_aux")


def computation_diff(stored: ModelConfig, current: ModelConfig) -> list[str]:
  """`field: stored -> current` for each field that changes the computation."""
  return [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(current, f.name)!r}"
          for f in dataclasses.fields(ModelConfig)
          if f.name not in NON_COMPUTATION_FIELDS
          and getattr(stored, f.name) != getattr(current, f.name)]


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], **overrides) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"{unknown[0]}: not a ModelConfig field")
  kw = {**d, **overrides}
  kw["rope_scaling"] = _coerce_rope_scaling(kw.get("rope_scaling"))
  return ModelConfig(**kw)
