"""Parameter counts and KV-cache size of a preset, without allocating weights.

    python -m coder_jax.model.info --preset coder_v2_lite

Active parameters are those a token's forward pass multiplies with: everything except the input
embedding table (a lookup) and the routed experts it is not sent to (n_routed - top_k per MoE
layer). This is the convention behind the published 2.4B (Lite) and 21B (236B) figures.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
from flax import nnx

from coder_jax.model.config import PRESETS, ModelConfig, get_config
from coder_jax.model.decoder import abstract_model


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  total = routed = 0
  for path, var in nnx.to_flat_state(abstract_model(cfg)[1].filter(nnx.Param)):
    n = math.prod(var.get_value().shape)
    total += n
    if path[-1].startswith("experts_"):
      routed += n
  embed = cfg.vocab_size * cfg.hidden_size
  n_moe = sum(k == "moe" for k in cfg.layer_kinds())
  per_expert = routed // (cfg.n_routed_experts * n_moe) if n_moe else 0
  unused = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert if n_moe else 0
  return {"total": total, "active": total - embed - unused, "embedding": embed,
          "routed_experts": routed}


def latent_values_per_token(cfg: ModelConfig) -> int:
  """Values MLA caches per token and layer: the normed latent plus the shared rope key (576 for
  the released models), instead of per-head keys and values."""
  return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
  return latent_values_per_token(cfg) * cfg.num_hidden_layers * bytes_per_value


def _fmt(n: float) -> str:
  for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= div:
      return f"{n / div:.2f}{unit}"
  return str(int(n))


def report(cfg: ModelConfig, name: str = "") -> str:
  c = param_counts(cfg)
  per_layer = latent_values_per_token(cfg)
  kv = kv_cache_bytes_per_token(cfg)
  mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
  lines = [
      f"preset               {name or '(custom)'}",
      f"layers               {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense first), "
      f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}",
      f"experts              {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + "
      f"{cfg.n_shared_experts} shared",
      f"total parameters     {_fmt(c['total'])} ({c['total']:,})",
      f"active parameters    {_fmt(c['active'])} ({c['active']:,}) per token",
      f"embedding table      {_fmt(c['embedding'])} (not counted as active)",
      f"KV cache per token   {per_layer} values/layer x {cfg.num_hidden_layers} layers = "
      f"{kv:,} bytes in bf16 ({kv / 1024:.1f} KiB); full-head MHA would need {mha:,}",
  ]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
  args = ap.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  print(report(get_config(args.preset), args.preset))


if __name__ == "__main__":
  np.set_printoptions(suppress=True)
  main()
