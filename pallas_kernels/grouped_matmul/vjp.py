"""custom_vjp wiring: the forward and backward of grouped matmul on one kernel backend.

dlhs = dout @ rhs[g]^T (the gmm kernel with transpose_rhs, so rhs^T is never materialised) and
drhs[g] = lhs[rows of g]^T @ dout[rows of g] (the tgmm kernel). group_sizes is an integer
input, so its cotangent is None (a symbolic zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from pallas_kernels.grouped_matmul import tpu, triton

_KERNELS = {"triton": triton, "tpu": tpu}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  backend: str                     # "triton" or "tpu"
  tiling: tuple[int, int, int]     # (tm, tk, tn), already fitted to the shapes
  out_dtype: np.dtype
  interpret: bool = False


def _gmm(cfg: KernelConfig, lhs, rhs_GKN, group_sizes_G, *, transpose_rhs, out_dtype):
  tm, tk, tn = cfg.tiling
  return _KERNELS[cfg.backend].gmm(
      lhs, rhs_GKN, group_sizes_G, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs,
      out_dtype=out_dtype, interpret=cfg.interpret)


def _tgmm(cfg: KernelConfig, lhs_MK, dout_MN, group_sizes_G, *, out_dtype):
  tm, tk, tn = cfg.tiling
  return _KERNELS[cfg.backend].tgmm(
      lhs_MK, dout_MN, group_sizes_G, tm=tm, tk=tk, tn=tn, out_dtype=out_dtype,
      interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm_with_vjp(lhs_MK, rhs_GKN, group_sizes_G, cfg: KernelConfig):
  return _gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G, transpose_rhs=False, out_dtype=cfg.out_dtype)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, cfg):
  out_MN = _gmm(cfg, lhs_MK, rhs_GKN, group_sizes_G, transpose_rhs=False,
                out_dtype=cfg.out_dtype)
  return out_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(cfg, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  # Trailing rows past sum(group_sizes) come out as zeros: gmm writes the virtual group.
  dlhs_MK = _gmm(cfg, dout_MN, rhs_GKN, group_sizes_G, transpose_rhs=True,
                 out_dtype=lhs_MK.dtype)
  drhs_GKN = _tgmm(cfg, lhs_MK, dout_MN, group_sizes_G, out_dtype=rhs_GKN.dtype)
  return dlhs_MK, drhs_GKN, None


gmm_with_vjp.defvjp(_gmm_fwd, _gmm_bwd)
