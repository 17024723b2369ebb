"""Where each Hugging Face tensor lives in the NNX model, and how its layout differs.

A Hub linear weight is [out, in]; ours keeps inputs first and splits the output per head where the
model needs it (e.g. q_proj [D, H, qk_head_dim], o_proj [H, v_head_dim, D]), so the conversion of
every linear is `W.T.reshape(ours)` and back `ours.reshape(prod(in dims), -1).T`.
"""

from __future__ import annotations

import dataclasses
import math

from coder_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str                    # Hub name
  hf_shape: tuple[int, ...]
  path: tuple | None           # path of the NNX parameter in nnx.state(model); None: empty
  index: tuple[int, ...]       # leading indices into that parameter (layer in run, expert)
  our_shape: tuple[int, ...]   # shape of param[index]
  n_in: int                    # input dims of a linear (0: not a linear, copied as is)

  def to_ours(self, w):
    if not self.n_in:
      return w
    return w.T.reshape(self.our_shape)

  def to_hf(self, w):
    if not self.n_in:
      return w
    return w.reshape(math.prod(self.our_shape[:self.n_in]), -1).T


def _linear(name, path, index, our_shape, n_in=1):
  hf = (math.prod(our_shape[n_in:]), math.prod(our_shape[:n_in]))
  return TensorSpec(name, hf, path, index, tuple(our_shape), n_in)


def _copy(name, path, index, shape):
  return TensorSpec(name, tuple(shape), path, index, tuple(shape), 0)


def _mlp(prefix, base, i, d, f):
  return [_linear(f"{prefix}.gate_proj.weight", base + ("gate_proj",), i, (d, f)),
          _linear(f"{prefix}.up_proj.weight", base + ("up_proj",), i, (d, f)),
          _linear(f"{prefix}.down_proj.weight", base + ("down_proj",), i, (f, d))]


def layer_locations(cfg: ModelConfig) -> list[tuple[int, int]]:
  """For each global layer: (run index in model.stacks, index within that run)."""
  out, run, pos, prev = [], -1, 0, None
  for kind in cfg.layer_kinds():
    if kind != prev:
      run, pos, prev = run + 1, 0, kind
    out.append((run, pos))
    pos += 1
  return out


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every tensor of the Hub checkpoint, in Hub order."""
  d, h, v = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
  specs = [_copy("model.embed_tokens.weight", ("embed_tokens",), (), (v, d))]
  kinds = cfg.layer_kinds()
  for layer, (run, pos) in enumerate(layer_locations(cfg)):
    p = f"model.layers.{layer}"
    base = ("stacks", run, "layers")
    i = (pos,)
    at = base + ("self_attn",)
    specs.append(_copy(f"{p}.input_layernorm.weight", base + ("input_layernorm", "weight"), i, (d,)))
    if cfg.q_lora_rank is None:
      specs.append(_linear(f"{p}.self_attn.q_proj.weight", at + ("q_proj",), i,
                           (d, h, cfg.qk_head_dim)))
    else:
      r = cfg.q_lora_rank
      specs += [_linear(f"{p}.self_attn.q_a_proj.weight", at + ("q_a_proj",), i, (d, r)),
                _copy(f"{p}.self_attn.q_a_layernorm.weight", at + ("q_a_layernorm", "weight"), i, (r,)),
                _linear(f"{p}.self_attn.q_b_proj.weight", at + ("q_b_proj",), i,
                        (r, h, cfg.qk_head_dim))]
    r = cfg.kv_lora_rank
    specs += [
        _linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", at + ("kv_a_proj_with_mqa",), i,
                (d, r + cfg.qk_rope_head_dim)),
        _copy(f"{p}.self_attn.kv_a_layernorm.weight", at + ("kv_a_layernorm", "weight"), i, (r,)),
        _linear(f"{p}.self_attn.kv_b_proj.weight", at + ("kv_b_proj",), i,
                (r, h, cfg.qk_nope_head_dim + cfg.v_head_dim)),
        _linear(f"{p}.self_attn.o_proj.weight", at + ("o_proj",), i, (h, cfg.v_head_dim, d), n_in=2),
        _copy(f"{p}.post_attention_layernorm.weight", base + ("post_attention_layernorm", "weight"),
              i, (d,)),
    ]
    mlp = base + ("mlp",)
    if kinds[layer] == "dense":
      specs += _mlp(f"{p}.mlp", mlp, i, d, cfg.intermediate_size)
      continue
    f, e = cfg.moe_intermediate_size, cfg.n_routed_experts
    specs.append(_linear(f"{p}.mlp.gate.weight", mlp + ("gate",), i, (d, e)))
    for x in range(e):
      q = f"{p}.mlp.experts.{x}"
      specs += [_linear(f"{q}.gate_proj.weight", mlp + ("experts_gate_proj",), (pos, x), (d, f)),
                _linear(f"{q}.up_proj.weight", mlp + ("experts_up_proj",), (pos, x), (d, f)),
                _linear(f"{q}.down_proj.weight", mlp + ("experts_down_proj",), (pos, x), (f, d))]
    if cfg.n_shared_experts:
      specs += _mlp(f"{p}.mlp.shared_experts", mlp + ("shared_experts",), i, d,
                    f * cfg.n_shared_experts)
    else:  # transformers builds (and saves) a zero-width MLP; remote-code exports have none
      specs += [_copy(f"{p}.mlp.shared_experts.{n}_proj.weight", None, (), shape)
                for n, shape in (("gate", (0, d)), ("up", (0, d)), ("down", (d, 0)))]
  specs.append(_copy("model.norm.weight", ("norm", "weight"), (), (d,)))
  if not cfg.tie_word_embeddings:
    specs.append(_linear("lm_head.weight", ("lm_head",), (), (d, v)))
  return specs


# Buffers some exports carry that hold no weights (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
