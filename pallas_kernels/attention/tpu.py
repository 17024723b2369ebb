"""TPU MLA flash attention in Pallas Mosaic: forward, dK/dV and dQ kernels.

Works on [B, H, T, D] (api.py transposes): Mosaic tiles the last two dims of a block, so the
head axis cannot sit between T and D. The kv (or q, in dK/dV) block axis is the innermost
"arbitrary" grid axis and accumulates in f32 VMEM scratch; under causal masking the index maps
clamp the block index so blocks above the diagonal neither compute nor fetch anything new.
Segment ids ride as [B, T, 1] (query side) and [B, 1, T] (key side) so their blocks are legal
Mosaic tiles. The residual is the natural-log lse as [B, H, T, 1]. Keys may outnumber queries
(S >= T): query row r then sits at key position q_offset + r (causal mask, block skipping),
with the keys' segment id and span at that position (spans.query_rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.spans import query_rows, segment_spans

MASKED = -1e30
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(qi, kj, bq, bk, qseg_ref, kseg_ref, *, causal, kv_len, use_seg, q_offset):
  rows = q_offset + qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  cols = kj * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  mask = None
  if causal:
    mask = cols <= rows
  if kv_len is not None:
    m = cols < kv_len
    mask = m if mask is None else mask & m
  if use_seg:
    m = qseg_ref[...] == kseg_ref[...]          # [bq, 1] == [1, bk]
    mask = m if mask is None else mask & m
  return mask


def _needed(qi, kj, bq, bk, causal, span_first_ref=None, span_last_ref=None, span_of_q=True,
            q_offset=0):
  """Whether block (qi, kj) can hold a visible entry: some key at or below some query's
  position (causal) and, with segments, inside the span of the block's documents (the spans of
  the outer block's rows, `span_of_q`: the query block's, else the key block's)."""
  ok = (kj * bk <= q_offset + (qi + 1) * bq - 1) if causal else True
  if span_first_ref is not None:
    lo, hi = jnp.min(span_first_ref[...]), jnp.max(span_last_ref[...])
    start, size = (kj * bk, bk) if span_of_q else (q_offset + qi * bq, bq)
    ok = ok & (start <= hi) & (start + size - 1 >= lo)
  return ok


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, sm_scale, causal, kv_len, use_seg, bq, bk, q_offset):
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_needed(qi, kj, bq, bk, causal, *_spans(use_seg, first_ref, last_ref),
                   q_offset=q_offset))
  def _():
    s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
    mask = _mask(qi, kj, bq, bk, qseg_ref, kseg_ref, causal=causal, kv_len=kv_len,
                 use_seg=use_seg, q_offset=q_offset)
    if mask is not None:
      s = jnp.where(mask, s, MASKED)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
    m_sc[...] = m_new

  @pl.when(kj == pl.num_programs(3) - 1)
  def _():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _probs(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, qi, kj, *, sm_scale, causal, kv_len,
           use_seg, bq, bk, q_offset):
  s = _dot(q_ref[...], k_ref[...], _NT) * sm_scale
  p = jnp.exp(s - lse_ref[...])
  mask = _mask(qi, kj, bq, bk, qseg_ref, kseg_ref, causal=causal, kv_len=kv_len, use_seg=use_seg,
               q_offset=q_offset)
  return p if mask is None else jnp.where(mask, p, 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, sm_scale, causal, kv_len, use_seg,
                 bq, bk, q_offset):
  kj, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_needed(qi, kj, bq, bk, causal, *_spans(use_seg, first_ref, last_ref),
                   span_of_q=False, q_offset=q_offset))
  def _():
    p = _probs(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, qi, kj, sm_scale=sm_scale,
               causal=causal, kv_len=kv_len, use_seg=use_seg, bq=bq, bk=bk, q_offset=q_offset)
    do = do_ref[...]
    dv_sc[...] += _dot(p.astype(do.dtype), do, _TN)
    dp = _dot(do, v_ref[...], _NT)
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += _dot(ds.astype(q_ref.dtype), q_ref[...], _TN)

  @pl.when(qi == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_sc[...] * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_sc, *, sm_scale, causal, kv_len, use_seg, bq, bk, q_offset):
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_needed(qi, kj, bq, bk, causal, *_spans(use_seg, first_ref, last_ref),
                   q_offset=q_offset))
  def _():
    p = _probs(q_ref, k_ref, lse_ref, qseg_ref, kseg_ref, qi, kj, sm_scale=sm_scale,
               causal=causal, kv_len=kv_len, use_seg=use_seg, bq=bq, bk=bk, q_offset=q_offset)
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += _dot(ds.astype(k_ref.dtype), k_ref[...])

  @pl.when(kj == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_sc[...] * sm_scale).astype(dq_ref.dtype)


def _spans(use_seg, first_ref, last_ref):
  return (first_ref, last_ref) if use_seg else (None, None)


def _block_maps(bq, bk, causal, q_outer: bool, q_offset=0, nq=None, nk=None):
  """Index maps for q-side and k-side blocks on grid (b, h, outer, inner).

  Causal blocks that would be skipped map to the last (or first) needed block, so the pipeline
  sees an unchanged index and issues no copy for them. nq / nk: the numbers of blocks.
  """
  def last_k(qi):
    return jnp.minimum((q_offset + (qi + 1) * bq - 1) // bk, nk - 1)

  def first_q(kj):
    return jnp.clip((kj * bk - q_offset) // bq, 0, nq - 1)

  if q_outer:   # forward / dQ: grid (b, h, qi, kj)
    kidx = (lambda qi, kj: jnp.minimum(kj, last_k(qi))) if causal else (lambda qi, kj: kj)
    return (lambda b, h, qi, kj: qi), (lambda b, h, qi, kj: kidx(qi, kj))
  qidx = (lambda kj, qi: jnp.maximum(qi, first_q(kj))) if causal else (lambda kj, qi: qi)
  return (lambda b, h, kj, qi: qidx(kj, qi)), (lambda b, h, kj, qi: kj)


def _specs(bq, bk, causal, q_outer, dqk, dv, q_offset=0, nq=None, nk=None):
  qmap, kmap = _block_maps(bq, bk, causal, q_outer, q_offset, nq, nk)
  q_side = lambda d: pl.BlockSpec((None, None, bq, d), lambda b, h, x, y: (b, h, qmap(b, h, x, y), 0))
  k_side = lambda d: pl.BlockSpec((None, None, bk, d), lambda b, h, x, y: (b, h, kmap(b, h, x, y), 0))
  qseg = pl.BlockSpec((None, bq, 1), lambda b, h, x, y: (b, qmap(b, h, x, y), 0))
  kseg = pl.BlockSpec((None, 1, bk), lambda b, h, x, y: (b, 0, kmap(b, h, x, y)))
  # Segment spans ride with the outer block (queries in forward / dQ, keys in dK/dV).
  span = qseg if q_outer else pl.BlockSpec((None, bk, 1),
                                            lambda b, h, x, y: (b, kmap(b, h, x, y), 0))
  return dict(q=q_side(dqk), k=k_side(dqk), v=k_side(dv), do=q_side(dv), row=q_side(1),
              qseg=qseg, kseg=kseg, dq=q_side(dqk), span=span)


_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _sides(seg, use_seg, q_offset, t):
  """Segment ids as Mosaic tiles (queries [B, T, 1], keys [B, 1, S]) and the spans of the
  queries' and of the keys' rows ([B, T, 1] each, [B, S, 1] each) from the keys' [B, S] ids."""
  first, last = segment_spans(seg, use_seg)
  qseg = query_rows(seg, q_offset, t)[:, :, None]
  q_spans = tuple(query_rows(a, q_offset, t)[:, :, None] for a in (first, last))
  return qseg, seg[:, None, :], q_spans, (first[:, :, None], last[:, :, None])


def forward(q, k, v, seg, *, sm_scale, causal, kv_len, use_seg, block_q, block_k, interpret,
            q_offset=0):
  """(out [B, H, T, Dv], lse [B, H, T, 1] float32) on padded [B, H, T, D] inputs (k, v:
  [B, H, S, D], seg: the keys' [B, S])."""
  b, h, t, dqk = q.shape
  s = k.shape[2]
  dv = v.shape[-1]
  nq, nk = t // block_q, s // block_k
  sp = _specs(block_q, block_k, causal, True, dqk, dv, q_offset, nq, nk)
  kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, kv_len=kv_len,
                             use_seg=use_seg, bq=block_q, bk=block_k, q_offset=q_offset)
  qseg, kseg, q_spans, _ = _sides(seg, use_seg, q_offset, t)
  return pl.pallas_call(
      kernel, grid=(b, h, nq, nk),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["qseg"], sp["kseg"], sp["span"], sp["span"]],
      out_specs=[sp["do"], sp["row"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, t, dv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, dv), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="mla_attention_fwd",
  )(q, k, v, qseg, kseg, *q_spans)


def backward(q, k, v, seg, o, lse, do, *, sm_scale, causal, kv_len, use_seg, block_q, block_k,
             interpret, q_offset=0):
  """(dq, dk, dv) on padded [B, H, T, D] inputs."""
  b, h, t, dqk = q.shape
  s = k.shape[2]
  dv_dim = v.shape[-1]
  nq, nk = t // block_q, s // block_k
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  common = dict(sm_scale=sm_scale, causal=causal, kv_len=kv_len, use_seg=use_seg, bq=block_q,
                bk=block_k, q_offset=q_offset)
  qseg, kseg, q_spans, k_spans = _sides(seg, use_seg, q_offset, t)
  tail = (do, lse, delta)

  sp = _specs(block_q, block_k, causal, False, dqk, dv_dim, q_offset, nq, nk)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **common), grid=(b, h, nk, nq),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["qseg"], sp["kseg"], sp["span"], sp["span"],
                sp["do"], sp["row"], sp["row"]],
      out_specs=[sp["k"], sp["v"]],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, dqk), jnp.float32),
                      pltpu.VMEM((block_k, dv_dim), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="mla_attention_dkdv",
  )(q, k, v, qseg, kseg, *k_spans, *tail)

  sp = _specs(block_q, block_k, causal, True, dqk, dv_dim, q_offset, nq, nk)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=(b, h, nq, nk),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["qseg"], sp["kseg"], sp["span"], sp["span"],
                sp["do"], sp["row"], sp["row"]],
      out_specs=sp["dq"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, dqk), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret, name="mla_attention_dq",
  )(q, k, v, qseg, kseg, *q_spans, *tail)
  return dq, dk, dv
