"""Pallas kernels for the two hot spots of a DeepSeek-V2 step, one folder per op.

  mla_attention(q, k, v, *, segment_ids, causal, sm_scale, backend, interpret)  -> [B, T, H, Dv]
  grouped_matmul(lhs, rhs, group_sizes, *, backend, interpret)                  -> [M, N]

Each op folder holds api.py (the public function), reference.py (plain XLA), one file per
backend (triton.py: GPU via Pallas Triton; tpu.py: TPU via Pallas Mosaic) and vjp.py. The
model reaches them through `attention_impl` / `moe_impl` (coder_jax/model/kernels.py).
Imports only jax and numpy.
"""

from pallas_kernels.attention import mla_attention, reference_attention
from pallas_kernels.grouped_matmul import grouped_matmul, reference_grouped_matmul

__all__ = ["grouped_matmul", "mla_attention", "reference_attention", "reference_grouped_matmul"]
