"""custom_vjp tying each backend's forward kernel to its backward kernels.

Works on the padded kernel layout (api.py pads and, for TPU, transposes outside, where plain
autodiff handles those reshapes). The residuals are the inputs, the output and the kernel's own
log-sum-exp; nothing of size T x T is saved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class KernelCall:
  """Everything static about one call: which module's kernels and their settings."""
  module: Any                      # pallas_kernels.attention.triton or .tpu
  sm_scale: float
  causal: bool
  kv_len: int | None               # real length when T was padded, else None
  use_seg: bool
  q_offset: int                    # key position of query 0 (S - T; 0 for T = S)
  fwd: tuple                       # (name, value) block sizes / launch settings for forward()
  bwd: tuple                       # and for backward()
  interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(call: KernelCall, q, k, v, seg):
  return _fwd(call, q, k, v, seg)[0]


def _kw(call: KernelCall, blocks: dict) -> dict:
  return dict(sm_scale=call.sm_scale, causal=call.causal, kv_len=call.kv_len,
              use_seg=call.use_seg, q_offset=call.q_offset, interpret=call.interpret,
              **dict(blocks))


def _fwd(call, q, k, v, seg):
  out, lse = call.module.forward(q, k, v, seg, **_kw(call, call.fwd))
  return out, (q, k, v, seg, out, lse)


def _bwd(call, res, dout):
  q, k, v, seg, out, lse = res
  dq, dk, dv = call.module.backward(q, k, v, seg, out, lse, dout, **_kw(call, call.bwd))
  return dq, dk, dv, None


attention.defvjp(_fwd, _bwd)
