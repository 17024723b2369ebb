"""`mla_attention`: one public function over the XLA reference and the TPU / GPU kernels."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.attention import vjp
from pallas_kernels.attention.reference import reference_attention
from pallas_kernels.backends import resolve_backend



@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows of q / k per block for the forward and the backward kernels, plus GPU launch settings.

  Triton blocks must be powers of two >= 16; TPU blocks multiples of 8 (key blocks of a padded
  sequence longer than the block: multiples of 128, Mosaic's lane width).
  """
  block_q: int
  block_k: int
  bwd_block_q: int
  bwd_block_k: int
  num_warps: int | None = None
  num_stages: int | None = None
  bwd_num_warps: int | None = None
  bwd_num_stages: int | None = None


# Not timed on hardware yet (benchmarks/RESULTS.md). Triton: compiled for H100 by
# `python -m pallas_kernels.compile_report`, none spills at the benchmark, Lite / 236B and ragged
# shapes; backward blocks of 64 x 64 spilled the dK/dV kernel (dK and dV accumulators of
# 64 x 320 f32) once segment ids or a padded tail add masks, 64 queries x 32 keys leave it ~20
# registers of headroom.
DEFAULT_BLOCKS = {
    "triton": BlockSizes(128, 64, 64, 32, num_warps=8, num_stages=2, bwd_num_warps=8,
                         bwd_num_stages=2),
    "tpu": BlockSizes(512, 512, 256, 512),
}


def _check(q, k, v, segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"mla_attention: q, k, v must be [B, T, H, D]; got ranks "
                     f"{q.ndim}, {k.ndim}, {v.ndim}")
  if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]) \
      or k.shape[1] < q.shape[1]:
    raise ValueError(f"mla_attention: k must be [B, S, H, D] with q's B, H, D and S >= T "
                     f"(q {q.shape}); got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"mla_attention: v must be [B, S, H, Dv] with k's B, S, H {k.shape[:3]}; "
                     f"got {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"mla_attention: q, k, v must share one floating dtype; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if segment_ids is not None:
    if segment_ids.shape != k.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"mla_attention: segment_ids must be integer [B, S] = {k.shape[:2]} (the "
                       f"keys' sequence); got {segment_ids.dtype}{list(segment_ids.shape)}")


def _fit_blocks(bs: BlockSizes, t: int, backend: str, s: int | None = None) -> BlockSizes:
  """Shrink blocks for short sequences (query blocks to t, key blocks to s, default t);
  validate what the backend can tile."""
  def cap(n):
    return max(16, 1 << (n - 1).bit_length()) if backend == "triton" else -(-n // 8) * 8
  if backend == "triton":
    ok = lambda b: b >= 16 and b & (b - 1) == 0
    need = "a power of two >= 16"
  else:
    ok = lambda b: b >= 8 and b % 8 == 0
    need = "a multiple of 8"
  fields = ("block_q", "block_k", "bwd_block_q", "bwd_block_k")
  for f in fields:
    if not ok(getattr(bs, f)):
      raise ValueError(f"mla_attention: {backend} {f} must be {need}; got {getattr(bs, f)}")
  n = {"block_q": t, "bwd_block_q": t, "block_k": s or t, "bwd_block_k": s or t}
  return dataclasses.replace(bs, **{f: min(getattr(bs, f), cap(n[f])) for f in fields})


def mla_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                  backend: str | None = None, interpret=False,
                  block_sizes: BlockSizes | None = None):
  """softmax(q k^T * sm_scale) v over [B, T, H, D] arrays with Dqk != Dv allowed.

  k, v may be longer than q ([B, S, H, D], S >= T): the queries are then the last T positions
  of the keys' sequence (query t sits at key position S - T + t; a context-parallel chunk of a
  longer sequence, model/context.py). segment_ids [B, S] (the keys' sequence; the queries' ids
  are its last T): tokens attend only to tokens with the same id (packed documents).
  backend: None picks by platform (GPU: Pallas Triton, TPU: Pallas Mosaic, else XLA).
  interpret: run the chosen kernel on CPU (Triton: Pallas' interpreter; TPU: TPU semantics via
  `pltpu.InterpretParams`, or pass an InterpretParams yourself).
  Differentiable in q, k, v (flash backward from the saved log-sum-exp).
  """
  backend = resolve_backend("mla_attention", backend, interpret)
  _check(q, k, v, segment_ids)
  b, t, h, dqk = q.shape
  s = k.shape[1]
  dv = v.shape[-1]
  sm_scale = float(dqk ** -0.5 if sm_scale is None else sm_scale)
  if backend == "xla":
    return reference_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale)

  bs = _fit_blocks(block_sizes or DEFAULT_BLOCKS[backend], t, backend, s)
  if s == t:
    step = math.lcm(bs.block_q, bs.block_k, bs.bwd_block_q, bs.bwd_block_k)
    t_pad = s_pad = -(-t // step) * step
  else:   # both ends padded at the back; the kernels place query t at key s - t + t_local
    step_q, step_k = math.lcm(bs.block_q, bs.bwd_block_q), math.lcm(bs.block_k, bs.bwd_block_k)
    t_pad, s_pad = -(-t // step_q) * step_q, -(-s // step_k) * step_k
  if backend == "tpu" and not interpret:
    for f in ("block_k", "bwd_block_k"):
      blk = getattr(bs, f)
      if blk != s_pad and blk % 128:
        raise ValueError(f"mla_attention: tpu {f} must be a multiple of 128 (Mosaic's lane "
                         f"width) when shorter than the padded sequence {s_pad}; got {blk}")
  # Triton dots need K >= 16: zero columns leave q.k unchanged and add only zero outputs.
  d_mult = 16 if backend == "triton" else 1
  dqk_pad, dv_pad = -(-dqk // d_mult) * d_mult, -(-dv // d_mult) * d_mult
  pad = lambda x, n, d: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d - x.shape[-1])))
  qp, kp, vp = pad(q, t_pad, dqk_pad), pad(k, s_pad, dqk_pad), pad(v, s_pad, dv_pad)
  seg = (jnp.zeros((b, s), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  seg = jnp.pad(seg, ((0, 0), (0, s_pad - s)))

  if backend == "triton":
    from pallas_kernels.attention import triton as module
    fwd = dict(block_q=bs.block_q, block_k=bs.block_k, num_warps=bs.num_warps,
               num_stages=bs.num_stages)
    bwd = dict(block_q=bs.bwd_block_q, block_k=bs.bwd_block_k, num_warps=bs.bwd_num_warps,
               num_stages=bs.bwd_num_stages)
    interp = bool(interpret)
  else:
    from jax.experimental.pallas import tpu as pltpu
    from pallas_kernels.attention import tpu as module
    fwd = dict(block_q=bs.block_q, block_k=bs.block_k)
    bwd = dict(block_q=bs.bwd_block_q, block_k=bs.bwd_block_k)
    interp = (pltpu.InterpretParams() if interpret is True else interpret) or False
    qp, kp, vp = (x.transpose(0, 2, 1, 3) for x in (qp, kp, vp))

  call = vjp.KernelCall(module=module, sm_scale=sm_scale, causal=bool(causal),
                        kv_len=s if s_pad > s else None, use_seg=segment_ids is not None,
                        q_offset=s - t,
                        fwd=tuple(fwd.items()), bwd=tuple(bwd.items()), interpret=interp)
  out = vjp.attention(call, qp, kp, vp, seg)
  if backend == "tpu":
    out = out.transpose(0, 2, 1, 3)
  return out[:, :t, :, :dv]
