"""GPU MLA flash attention in Pallas Triton: forward, dK/dV and dQ kernels.

Layout stays [B, T, H, D] (no transposes): a program owns one (row block, batch, head). Triton
tensors must have power-of-two sizes, so head dims are split into power-of-two column chunks
(192 = 128 + 64) and every score is a sum of per-chunk dots; v is never padded to Dqk. The
softmax runs in base 2 (exp2 of logits pre-multiplied by log2(e)); the residual is the base-2
log-sum-exp, which only this file's backward reads. api.py pads T to a block multiple and each
head dim to a multiple of 16 before calling. Keys may outnumber queries (S >= T): query row r
then sits at key position q_offset + r for the causal mask and the block bounds, and its
segment id and span are the keys' at that position (spans.query_rows).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.spans import query_rows, segment_spans

LOG2E = math.log2(math.e)
MASKED = -1e30  # finite, so a fully masked block never makes inf - inf


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
  """(offset, size) power-of-two pieces covering 0..d, largest first (192 -> 128 + 64)."""
  out, off = [], 0
  for bit in reversed(range(d.bit_length())):
    size = 1 << bit
    if d - off >= size:
      out.append((off, size))
      off += size
  return tuple(out)


def _precision(dtype):
  # fp32 inputs must not silently drop to TF32 on the tensor cores.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _scores(q_chunks, k_ref, start, rows, cols, qseg, kseg, *, scale2, causal, kv_len, use_seg, prec):
  """Masked base-2 logits [len(rows), len(cols)] of the loaded q chunks against k rows `cols`."""
  s = None
  for (off, size), qc in q_chunks:
    kc = k_ref[pl.ds(start, cols.shape[0]), pl.ds(off, size)]
    part = pl.dot(qc, kc, trans_b=True, precision=prec)
    s = part if s is None else s + part
  s = s * scale2
  mask = _mask(rows, cols, qseg, kseg, causal=causal, kv_len=kv_len, use_seg=use_seg)
  return s if mask is None else jnp.where(mask, s, MASKED), mask


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, o_ref, lse_ref, *,
                scale2, causal, kv_len, use_seg, bq, bk, seq_k, qk_chunks, v_chunks, q_offset):
  i = pl.program_id(0)
  prec = _precision(q_ref.dtype)
  rows = q_offset + i * bq + jnp.arange(bq)
  q_chunks = [((off, size), q_ref[:, pl.ds(off, size)]) for off, size in qk_chunks]
  qseg = qseg_ref[...] if use_seg else None
  lo, mid, hi = _kv_blocks(i, first_ref, last_ref, bq, bk, seq_k, causal, use_seg, q_offset)

  def body(j, carry, diagonal):
    m, l, accs = carry
    cols = j * bk + jnp.arange(bk)
    kseg = kseg_ref[pl.ds(j * bk, bk)] if use_seg else None
    s, _ = _scores(q_chunks, k_ref, j * bk, rows, cols, qseg, kseg, scale2=scale2,
                   causal=diagonal, kv_len=kv_len, use_seg=use_seg, prec=prec)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    l = l * alpha + p.sum(axis=1)
    p = p.astype(v_ref.dtype)
    accs = tuple(acc * alpha[:, None] + pl.dot(p, v_ref[pl.ds(j * bk, bk), pl.ds(off, size)],
                                               precision=prec)
                 for acc, (off, size) in zip(accs, v_chunks))
    return m_new, l, accs

  init = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
          tuple(jnp.zeros((bq, size), jnp.float32) for _, size in v_chunks))
  carry = lax.fori_loop(lo, mid, functools.partial(body, diagonal=False), init)
  m, l, accs = lax.fori_loop(mid, hi, functools.partial(body, diagonal=causal), carry)
  for acc, (off, size) in zip(accs, v_chunks):
    o_ref[:, pl.ds(off, size)] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dkdv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, scale2, sm_scale, causal, kv_len, use_seg, bq, bk,
                 seq_q, qk_chunks, v_chunks, q_offset):
  j = pl.program_id(0)
  prec = _precision(q_ref.dtype)
  cols = j * bk + jnp.arange(bk)
  k_chunks = [k_ref[:, pl.ds(off, size)] for off, size in qk_chunks]
  v_parts = [v_ref[:, pl.ds(off, size)] for off, size in v_chunks]
  kseg = kseg_ref[...] if use_seg else None
  n_q = seq_q // bq
  # Causal: q blocks before `first` see none of these keys; from `full` on they see all. Query
  # row r sits at key position q_offset + r.
  first = jnp.maximum((j * bk - q_offset) // bq, 0) if causal else 0
  upper = n_q
  if use_seg:   # only queries within these keys' segments' spans can see them
    first = jnp.maximum(first, (jnp.min(first_ref[...]) - q_offset) // bq)
    upper = jnp.minimum(upper, (jnp.max(last_ref[...]) - q_offset) // bq + 1)
  full = (jnp.clip(pl.cdiv((j + 1) * bk - 1 - q_offset, bq), first, jnp.maximum(first, upper))
          if causal else first)

  def body(i, carry, diagonal):
    dks, dvs = carry
    rows = q_offset + i * bq + jnp.arange(bq)
    q_chunks = [q_ref[pl.ds(i * bq, bq), pl.ds(off, size)] for off, size in qk_chunks]
    s = None
    for qc, kc in zip(q_chunks, k_chunks):
      part = pl.dot(qc, kc, trans_b=True, precision=prec)
      s = part if s is None else s + part
    qseg = qseg_ref[pl.ds(i * bq, bq)] if use_seg else None
    lse = lse_ref[pl.ds(i * bq, bq)]
    p = jnp.exp2(s * scale2 - lse[:, None])
    mask = _mask(rows, cols, qseg, kseg, causal=diagonal, kv_len=kv_len, use_seg=use_seg)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    do_parts = [do_ref[pl.ds(i * bq, bq), pl.ds(off, size)] for off, size in v_chunks]
    dp = None
    for dc, vc in zip(do_parts, v_parts):
      part = pl.dot(dc, vc, trans_b=True, precision=prec)
      dp = part if dp is None else dp + part
    ds = p * (dp - delta_ref[pl.ds(i * bq, bq)][:, None])
    pc, dsc = p.astype(do_ref.dtype), ds.astype(q_ref.dtype)
    dvs = tuple(dv + pl.dot(pc, dc, trans_a=True, precision=prec) for dv, dc in zip(dvs, do_parts))
    dks = tuple(dk + pl.dot(dsc, qc, trans_a=True, precision=prec)
                for dk, qc in zip(dks, q_chunks))
    return dks, dvs

  init = (tuple(jnp.zeros((bk, size), jnp.float32) for _, size in qk_chunks),
          tuple(jnp.zeros((bk, size), jnp.float32) for _, size in v_chunks))
  carry = lax.fori_loop(first, full, functools.partial(body, diagonal=causal), init)
  dks, dvs = lax.fori_loop(full, upper, functools.partial(body, diagonal=False), carry)
  for dk, (off, size) in zip(dks, qk_chunks):
    dk_ref[:, pl.ds(off, size)] = (dk * sm_scale).astype(dk_ref.dtype)
  for dv, (off, size) in zip(dvs, v_chunks):
    dv_ref[:, pl.ds(off, size)] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, scale2, sm_scale, causal, kv_len, use_seg, bq, bk, seq_k,
               qk_chunks, v_chunks, q_offset):
  i = pl.program_id(0)
  prec = _precision(q_ref.dtype)
  rows = q_offset + i * bq + jnp.arange(bq)
  q_chunks = [((off, size), q_ref[:, pl.ds(off, size)]) for off, size in qk_chunks]
  do_parts = [do_ref[:, pl.ds(off, size)] for off, size in v_chunks]
  qseg = qseg_ref[...] if use_seg else None
  lse, delta = lse_ref[...], delta_ref[...]
  lo, mid, hi = _kv_blocks(i, first_ref, last_ref, bq, bk, seq_k, causal, use_seg, q_offset)

  def body(j, dqs, diagonal):
    cols = j * bk + jnp.arange(bk)
    kseg = kseg_ref[pl.ds(j * bk, bk)] if use_seg else None
    s, mask = _scores(q_chunks, k_ref, j * bk, rows, cols, qseg, kseg, scale2=scale2,
                      causal=diagonal, kv_len=kv_len, use_seg=use_seg, prec=prec)
    p = jnp.exp2(s - lse[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = None
    for dc, (off, size) in zip(do_parts, v_chunks):
      part = pl.dot(dc, v_ref[pl.ds(j * bk, bk), pl.ds(off, size)], trans_b=True, precision=prec)
      dp = part if dp is None else dp + part
    ds = (p * (dp - delta[:, None])).astype(k_ref.dtype)
    return tuple(dq + pl.dot(ds, k_ref[pl.ds(j * bk, bk), pl.ds(off, size)], precision=prec)
                 for dq, (off, size) in zip(dqs, qk_chunks))

  dqs = tuple(jnp.zeros((bq, size), jnp.float32) for _, size in qk_chunks)
  dqs = lax.fori_loop(lo, mid, functools.partial(body, diagonal=False), dqs)
  dqs = lax.fori_loop(mid, hi, functools.partial(body, diagonal=causal), dqs)
  for dq, (off, size) in zip(dqs, qk_chunks):
    dq_ref[:, pl.ds(off, size)] = (dq * sm_scale).astype(dq_ref.dtype)


def _kv_blocks(i, first_ref, last_ref, bq, bk, seq_k, causal, use_seg, q_offset=0):
  """Key blocks [lo, hi) query block i must visit; those in [lo, mid) lie wholly below the
  diagonal (no causal mask needed). With segments, only blocks inside the span of the block's
  segments (first to last occurrence of their ids) can hold a visible key."""
  lo, hi = 0, seq_k // bk
  if causal:
    hi = pl.cdiv(jnp.minimum(q_offset + (i + 1) * bq, seq_k), bk)
  if use_seg:
    lo = jnp.min(first_ref[...]) // bk
    hi = jnp.minimum(hi, jnp.max(last_ref[...]) // bk + 1)
  mid = jnp.clip((q_offset + i * bq + 1) // bk, lo, jnp.maximum(lo, hi)) if causal else hi
  return lo, mid, hi


def _mask(rows, cols, qseg, kseg, *, causal, kv_len, use_seg):
  mask = None
  if causal:
    mask = cols[None, :] <= rows[:, None]
  if kv_len is not None:
    m = jnp.broadcast_to(cols[None, :] < kv_len, (rows.shape[0], cols.shape[0]))
    mask = m if mask is None else mask & m
  if use_seg:
    m = qseg[:, None] == kseg[None, :]
    mask = m if mask is None else mask & m
  return mask


def _query_side(seg, use_seg, q_offset, t):
  """(queries' segment ids, their spans' first, last) [B, T] from the keys' [B, S] ids."""
  first, last = segment_spans(seg, use_seg)
  return tuple(query_rows(a, q_offset, t) for a in (seg, first, last))


def forward(q, k, v, seg, *, sm_scale, causal, kv_len, use_seg, block_q, block_k, num_warps,
            num_stages, interpret, q_offset=0):
  """(out [B, T, H, Dv], base-2 lse [B, H, T] float32) on padded inputs (seg: the keys' [B, S])."""
  b, t, h, dqk = q.shape
  s = k.shape[1]
  dv = v.shape[-1]
  kernel = functools.partial(
      _fwd_kernel, scale2=sm_scale * LOG2E, causal=causal, kv_len=kv_len, use_seg=use_seg,
      bq=block_q, bk=block_k, seq_k=s, qk_chunks=pow2_chunks(dqk), v_chunks=pow2_chunks(dv),
      q_offset=q_offset)
  qseg, qfirst, qlast = _query_side(seg, use_seg, q_offset, t)
  row = lambda d: pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  full = lambda d: pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  return pl.pallas_call(
      kernel, grid=(t // block_q, b, h),
      in_specs=[row(dqk), full(dqk), full(dv),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
                pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0)),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i))],
      out_specs=[row(dv), pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct((b, t, h, dv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="mla_attention_fwd",
  )(q, k, v, qseg, seg, qfirst, qlast)


def backward(q, k, v, seg, o, lse, do, *, sm_scale, causal, kv_len, use_seg, block_q, block_k,
             num_warps, num_stages, interpret, q_offset=0):
  """(dq, dk, dv) on padded inputs; lse is forward()'s base-2 residual."""
  b, t, h, dqk = q.shape
  s = k.shape[1]
  dv_dim = v.shape[-1]
  delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  spans = segment_spans(seg, use_seg)
  qseg, qfirst, qlast = _query_side(seg, use_seg, q_offset, t)
  common = dict(scale2=sm_scale * LOG2E, sm_scale=sm_scale, causal=causal, kv_len=kv_len,
                use_seg=use_seg, bq=block_q, bk=block_k, qk_chunks=pow2_chunks(dqk),
                v_chunks=pow2_chunks(dv_dim), q_offset=q_offset)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  full = lambda n, d: pl.BlockSpec((None, n, None, d), lambda r, bi, hi: (bi, 0, hi, 0))
  full_seg = lambda n: pl.BlockSpec((None, n), lambda r, bi, hi: (bi, 0))
  full_row = pl.BlockSpec((None, None, t), lambda r, bi, hi: (bi, hi, 0))

  kblk = lambda d: pl.BlockSpec((None, block_k, None, d), lambda j, bi, hi: (bi, j, hi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, seq_q=t, **common), grid=(s // block_k, b, h),
      in_specs=[full(t, dqk), kblk(dqk), kblk(dv_dim), full_seg(t),
                pl.BlockSpec((None, block_k), lambda j, bi, hi: (bi, j)),
                pl.BlockSpec((None, block_k), lambda j, bi, hi: (bi, j)),
                pl.BlockSpec((None, block_k), lambda j, bi, hi: (bi, j)),
                full(t, dv_dim), full_row, full_row],
      out_specs=[kblk(dqk), kblk(dv_dim)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="mla_attention_dkdv",
  )(q, k, v, qseg, seg, *spans, do, lse, delta)

  qblk = lambda d: pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  row_vec = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, seq_k=s, **common), grid=(t // block_q, b, h),
      in_specs=[qblk(dqk), full(s, dqk), full(s, dv_dim),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)), full_seg(s),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
                pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
                qblk(dv_dim), row_vec, row_vec],
      out_specs=qblk(dqk),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret, name="mla_attention_dq",
  )(q, k, v, qseg, seg, qfirst, qlast, do, lse, delta)
  return dq, dk, dv
