"""MLA flash attention: `mla_attention` (api.py), the XLA reference, GPU (triton.py) and TPU
(tpu.py) kernels, and their custom_vjp (vjp.py)."""

from pallas_kernels.attention.api import BlockSizes, DEFAULT_BLOCKS, mla_attention
from pallas_kernels.attention.reference import reference_attention

__all__ = ["BlockSizes", "DEFAULT_BLOCKS", "mla_attention", "reference_attention"]
