"""FLOPs of a training step and the peak of the device, for MFU.

Per token: 6 x active matmul parameters (the LM head included, the embedding lookup and unrouted
experts excluded) + attention 3 x layers x heads x (qk_head_dim + v_head_dim) x seq_len
(QK^T and PV forward are 2*T*T*H*d each, halved by the causal mask, times 3 for fwd+bwd).
"""

from __future__ import annotations

import jax

from coder_jax.model.info import param_counts

# Dense bf16 peak TFLOP/s per device (vendor specs).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("B200", 2250.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def train_flops_per_token(cfg, seq_len: int) -> float:
  active = param_counts(cfg)["active"]
  attn = 3.0 * cfg.num_hidden_layers * cfg.num_attention_heads * (
      cfg.qk_head_dim + cfg.v_head_dim) * seq_len
  return 6.0 * active + attn


def peak_flops_per_device(device=None) -> float | None:
  """bf16 dense peak FLOP/s of the device, None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None
