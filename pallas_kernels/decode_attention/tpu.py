"""TPU MLA decode attention over the latent cache in Pallas Mosaic.

Grid (B, S blocks): the S axis is "arbitrary" and accumulates the online softmax in f32 VMEM
scratch (m, l: [H, 1]; acc: [H, R] with R, the widest dim, on the 128 lanes). All heads of a row
share the cache block, so each step is q_lat[H, R] @ c[bs, R]^T + q_rope[H, Dr] @ k_r[bs, Dr]^T
and p[H, bs] @ c[bs, R]. lengths is scalar-prefetched into SMEM: blocks at or past lengths[b]
skip their compute, and the index maps clamp them to the row's last live block, so the pipeline
sees an unchanged block index and issues no DMA for them; cost follows the real length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASKED = -1e30
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_NN = (((1,), (0,)), ((), ()))   # a @ b


def _dot(a, b, dims, prec):
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _kernel(len_ref, ql_ref, qr_ref, c_ref, kr_ref, o_ref, m_sc, l_sc, acc_sc, *, sm_scale, bs,
            prec):
  bi, j = pl.program_id(0), pl.program_id(1)
  length = len_ref[bi]

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * bs < length)
  def _():
    h = ql_ref.shape[0]
    # Rows past the length (stale tokens, NaN, or the undefined tail of a partial edge block)
    # are zeroed: a masked probability of 0 times NaN would still poison the output dot.
    # Full-shape iotas: Mosaic handles these better than a broadcast [bs, 1] mask.
    keep = lambda x: jnp.where(j * bs + lax.broadcasted_iota(jnp.int32, x.shape, 0) < length,
                               x, jnp.zeros(x.shape, x.dtype))
    c, kr = keep(c_ref[...]), keep(kr_ref[...])
    s = (_dot(ql_ref[...], c, _NT, prec) + _dot(qr_ref[...], kr, _NT, prec)) * sm_scale
    cols = j * bs + lax.broadcasted_iota(jnp.int32, (h, bs), 1)
    s = jnp.where(cols < length, s, MASKED)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(c.dtype), c, _NN, prec)
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    l = l_sc[...]
    # lengths[b] == 0: nothing accumulated, l = 0; the row's output is defined as zeros.
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)


def decode(q_lat, q_rope, c, kr, lengths, *, sm_scale, block_s, interpret):
  """[B, H, R] in q_lat's dtype. lengths [B] int32 already clipped to [0, S].

  block_s is S or, for several blocks, a multiple of 8 (128 when compiled, api.py checks);
  a partial last block is fine because every row at or past the length is masked.
  """
  b, h, r = q_lat.shape
  s, dr = c.shape[1], kr.shape[-1]
  n_blocks = pl.cdiv(s, block_s)

  def cache_map(bi, j, lens):
    # Past the row's last live block, keep pointing at that block: no new DMA for skipped steps.
    last = jnp.maximum(pl.cdiv(lens[bi], block_s) - 1, 0)
    return bi, jnp.minimum(j, last), 0

  q_spec = lambda d: pl.BlockSpec((None, h, d), lambda bi, j, lens: (bi, 0, 0))
  cache = lambda d: pl.BlockSpec((None, block_s, d), cache_map)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, n_blocks),
      in_specs=[q_spec(r), q_spec(dr), cache(r), cache(dr)],
      out_specs=q_spec(r),
      scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                      pltpu.VMEM((h, r), jnp.float32)])
  prec = lax.Precision.HIGHEST if q_lat.dtype == jnp.float32 else None
  kernel = functools.partial(_kernel, sm_scale=sm_scale, bs=block_s, prec=prec)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, h, r), q_lat.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret, name="mla_decode_attention",
  )(lengths, q_lat, q_rope, c, kr)
