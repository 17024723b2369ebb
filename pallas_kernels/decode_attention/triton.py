"""GPU MLA decode attention over the latent cache in Pallas Triton (flash-decoding).

Every head reads the same cache row (MQA-like after absorbing W_uk), so one program owns a
(batch row, head block, S split) and loads each cache block once for all its heads: the scores
are q_lat[H, R] @ c[bs, R]^T + q_rope[H, Dr] @ k_r[bs, Dr]^T, the output accumulates
p[H, bs] @ c[bs, R]. Each split loops only over the blocks below lengths[b] (a dynamic trip
count), so the cost follows the real length, not the cache capacity S. Splits write unnormalised
partials (m, l, acc) that `decode` merges in XLA with a log-sum-exp.

Triton tensors need power-of-two sizes and dots need every dim >= 16: api.py pads H to whole
16-head blocks and R / Dr to multiples of 16; R and Dr are then covered by power-of-two column
chunks (48 = 32 + 16). S is never padded: loads past lengths[b] (the S tail
included) are masked to zero, so stale or NaN cache slots are never even read.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
MASKED = -1e30  # finite, so an empty split's m never makes inf - inf in the merge
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_NN = (((1,), (0,)), ((), ()))   # a @ b


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
  """(offset, size) power-of-two pieces covering 0..d, largest first (48 -> 32 + 16)."""
  out, off = [], 0
  for bit in reversed(range(d.bit_length())):
    if d - off >= 1 << bit:
      out.append((off, 1 << bit))
      off += 1 << bit
  return tuple(out)


def _dot(a, b, dims, prec):
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _kernel(len_ref, ql_ref, qr_ref, c_ref, kr_ref, acc_ref, m_ref, l_ref, *, scale2, bs,
            blocks_per_split, r_chunks, d_chunks, prec):
  split = pl.program_id(2)
  length = len_ref[0]
  first = split * blocks_per_split
  stop = jnp.minimum(first + blocks_per_split, pl.cdiv(length, bs))
  q_lat = [ql_ref[:, pl.ds(off, size)] for off, size in r_chunks]
  q_rope = [qr_ref[:, pl.ds(off, size)] for off, size in d_chunks]
  hb = q_lat[0].shape[0]

  def load(ref, start, valid, off, size):
    mask = jnp.broadcast_to(valid[:, None], (bs, size))
    return plgpu.load(ref.at[pl.ds(start, bs), pl.ds(off, size)], mask=mask, other=0)

  def body(j, carry):
    m, l, accs = carry
    start = j * bs
    valid = start + jnp.arange(bs) < length
    # Loaded once, used by both the scores and the output dot.
    c_parts = [load(c_ref, start, valid, off, size) for off, size in r_chunks]
    s = None
    for q, c in zip(q_lat, c_parts):
      part = _dot(q, c, _NT, prec)
      s = part if s is None else s + part
    for q, (off, size) in zip(q_rope, d_chunks):
      s = s + _dot(q, load(kr_ref, start, valid, off, size), _NT, prec)
    s = jnp.where(valid[None, :], s * scale2, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    alpha = jnp.exp2(m - m_new)
    l = l * alpha + p.sum(axis=1)
    p = p.astype(c_parts[0].dtype)
    accs = tuple(acc * alpha[:, None] + _dot(p, c, _NN, prec) for acc, c in zip(accs, c_parts))
    return m_new, l, accs

  init = (jnp.full((hb,), MASKED, jnp.float32), jnp.zeros((hb,), jnp.float32),
          tuple(jnp.zeros((hb, size), jnp.float32) for _, size in r_chunks))
  m, l, accs = lax.fori_loop(first, stop, body, init)
  for acc, (off, size) in zip(accs, r_chunks):
    acc_ref[:, pl.ds(off, size)] = acc
  m_ref[...] = m
  l_ref[...] = l


def partials(q_lat, q_rope, c, kr, lengths, *, sm_scale, block_h, block_s, num_splits, num_warps,
             num_stages, interpret):
  """Per-split (acc [B, NS, H, R], m [B, NS, H], l [B, NS, H]) float32, base-2 m.

  Inputs are api.py's padded arrays: q_lat [B, H, R], q_rope [B, H, Dr], c [B, S, R],
  kr [B, S, Dr], lengths [B, 1] int32 already clipped to [0, S].
  """
  b, h, r = q_lat.shape
  s, dr = c.shape[1], kr.shape[-1]
  blocks_per_split = pl.cdiv(pl.cdiv(s, block_s), num_splits)
  # fp32 inputs must not silently drop to TF32 on the tensor cores.
  prec = lax.Precision.HIGHEST if q_lat.dtype == jnp.float32 else None
  kernel = functools.partial(
      _kernel, scale2=sm_scale * LOG2E, bs=block_s, blocks_per_split=blocks_per_split,
      r_chunks=pow2_chunks(r), d_chunks=pow2_chunks(dr), prec=prec)
  q_spec = lambda d: pl.BlockSpec((None, block_h, d), lambda bi, hi, k: (bi, hi, 0))
  cache = lambda d: pl.BlockSpec((None, s, d), lambda bi, hi, k: (bi, 0, 0))
  row = pl.BlockSpec((None, None, block_h), lambda bi, hi, k: (bi, k, hi))
  return pl.pallas_call(
      kernel, grid=(b, h // block_h, num_splits),
      in_specs=[pl.BlockSpec((None, 1), lambda bi, hi, k: (bi, 0)), q_spec(r), q_spec(dr),
                cache(r), cache(dr)],
      out_specs=[pl.BlockSpec((None, None, block_h, r), lambda bi, hi, k: (bi, k, hi, 0)),
                 row, row],
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, r), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="mla_decode_attention",
  )(lengths, q_lat, q_rope, c, kr)


def merge(acc, m, l):
  """Combine split partials into [B, H, R] float32; rows with no tokens (l = 0) give zeros."""
  m_all = m.max(axis=1, keepdims=True)
  w = jnp.exp2(m - m_all)            # empty splits: m = MASKED, so w = 0 unless all are empty
  l_all = (w * l).sum(axis=1)
  o = (w[..., None] * acc).sum(axis=1)
  return o / jnp.where(l_all > 0, l_all, 1.0)[..., None]


def decode(q_lat, q_rope, c, kr, lengths, **kw):
  """Kernel + XLA merge: [B, H, R] float32 on padded inputs (see `partials`)."""
  return merge(*partials(q_lat, q_rope, c, kr, lengths, **kw))
