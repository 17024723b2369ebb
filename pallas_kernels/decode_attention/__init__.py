"""MLA decode attention over the latent KV cache: `latent_decode_attention` (api.py), the XLA
reference, and the GPU (triton.py) and TPU (tpu.py) kernels. Inference only."""

from pallas_kernels.decode_attention.api import latent_decode_attention
from pallas_kernels.decode_attention.reference import reference_latent_decode_attention

__all__ = ["latent_decode_attention", "reference_latent_decode_attention"]
