"""Grouped (ragged) matmul for MoE experts: Pallas Triton (GPU) and Mosaic (TPU) kernels with a
custom VJP, plus the plain XLA reference.

  grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]
"""

from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.grouped_matmul.reference import reference_grouped_matmul

__all__ = ["grouped_matmul", "reference_grouped_matmul"]
