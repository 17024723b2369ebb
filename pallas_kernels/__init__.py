"""Pallas kernels for MLA training and decoding, one folder per op.

  mla_attention(q, k, v, *, segment_ids, causal, sm_scale, backend, interpret)  -> [B, T, H, Dv]
  grouped_matmul(lhs, rhs, group_sizes, *, backend, interpret)                  -> [M, N]
  latent_decode_attention(q_latent, q_rope, latent_cache, rope_cache, lengths, *, sm_scale)
                                                                                -> [B, H, R]

Each op folder holds api.py (the public function), reference.py (plain XLA), one file per
backend (triton.py: GPU via Pallas Triton; tpu.py: TPU via Pallas Mosaic) and vjp.py. The
model reaches them through `attention_impl` / `moe_impl` (coder_jax/model/kernels.py), and
decoding through coder_jax/decode/attention.py.
Imports only jax and numpy.
"""

from pallas_kernels.attention import mla_attention, reference_attention
from pallas_kernels.decode_attention import latent_decode_attention
from pallas_kernels.grouped_matmul import grouped_matmul, reference_grouped_matmul

__all__ = ["grouped_matmul", "latent_decode_attention", "mla_attention", "reference_attention",
           "reference_grouped_matmul"]
