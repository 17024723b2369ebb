"""Plain XLA grouped matmul: the oracle for the kernels and the "xla" backend.

lax.ragged_dot is exact (float32 accumulation, HIGHEST precision so float32 never drops to TF32 /
bf16 passes) and jax autodiff differentiates it, which gives the reference gradients for free.
Rows at or beyond sum(group_sizes) come out as zeros.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def reference_grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, *, preferred_element_type=None):
  """out[r] = lhs[r] @ rhs[g(r)] for rows of group g; rows past sum(group_sizes) are zero."""
  out_dtype = lhs_MK.dtype if preferred_element_type is None else preferred_element_type
  compute_dtype = jnp.promote_types(lhs_MK.dtype, rhs_GKN.dtype)
  out_MN = lax.ragged_dot(
      lhs_MK.astype(compute_dtype), rhs_GKN.astype(compute_dtype),
      group_sizes_G.astype(jnp.int32),
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return out_MN.astype(jnp.dtype(out_dtype))


def reference_tgmm(lhs_MK, dout_MN, group_sizes_G, *, out_dtype=None):
  """drhs[g] = lhs[rows of g]^T @ dout[rows of g] -> [G, K, N]; empty groups give zeros."""
  out_dtype = jnp.dtype(lhs_MK.dtype if out_dtype is None else out_dtype)
  compute_dtype = jnp.promote_types(lhs_MK.dtype, dout_MN.dtype)
  m = lhs_MK.shape[0]
  sizes_G = group_sizes_G.astype(jnp.int32)
  ends_G = jnp.cumsum(sizes_G)
  row_M = jnp.arange(m, dtype=jnp.int32)
  # [G, M] membership; G*M booleans are small next to the [G, K, N] result.
  member_GM = (row_M[None, :] >= (ends_G - sizes_G)[:, None]) & (row_M[None, :] < ends_G[:, None])
  lhs_GMK = jnp.where(member_GM[:, :, None], lhs_MK.astype(compute_dtype)[None], 0)
  out_GKN = jnp.einsum("gmk,mn->gkn", lhs_GMK, dout_MN.astype(compute_dtype),
                       precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return out_GKN.astype(out_dtype)
