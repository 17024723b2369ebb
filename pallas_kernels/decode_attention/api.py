"""`latent_decode_attention`: one public function over the XLA reference and the TPU / GPU
decode kernels for MLA's latent KV cache (kv_b_proj absorbed into the query and output)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backends import resolve_backend
from pallas_kernels.decode_attention.reference import reference_latent_decode_attention


# Starting points, not tuned on hardware yet.
TRITON_HEAD_BLOCK = 16        # heads per program: tl.dot's minimum M; more heads -> more programs
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 2
TRITON_CACHE_TILE_BYTES = 64 * 1024   # one [block_s, R] cache tile; x num_stages in shared memory
TRITON_MAX_BLOCK_S = 64
GPU_SM_COUNT = 132            # H100 SXM: default splits aim for at least one program per SM
TPU_BLOCK_S = 512


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _check(q_latent, q_rope, latent_cache, rope_cache, lengths, backend, interpret, num_splits,
           launch):
  arrays = (q_latent, q_rope, latent_cache, rope_cache)
  if any(x.ndim != 3 for x in arrays):
    raise ValueError("latent_decode_attention: q_latent [B, H, R], q_rope [B, H, Dr], "
                     "latent_cache [B, S, R], rope_cache [B, S, Dr] must all be rank 3; got ranks "
                     f"{tuple(x.ndim for x in arrays)}")
  b, h, r = q_latent.shape
  s = latent_cache.shape[1]
  dr = q_rope.shape[-1]
  if q_rope.shape[:2] != (b, h):
    raise ValueError(f"latent_decode_attention: q_rope must be [B, H, Dr] with q_latent's B, H "
                     f"{(b, h)}; got {q_rope.shape}")
  if latent_cache.shape[0] != b or latent_cache.shape[2] != r:
    raise ValueError(f"latent_decode_attention: latent_cache must be [B, S, R] with B={b}, R={r}; "
                     f"got {latent_cache.shape}")
  if rope_cache.shape != (b, s, dr):
    raise ValueError(f"latent_decode_attention: rope_cache must be [B, S, Dr] = {(b, s, dr)}; "
                     f"got {rope_cache.shape}")
  if min(h, r, dr, s) < 1:
    raise ValueError(f"latent_decode_attention: H, R, Dr and S must be >= 1; got H={h}, R={r}, "
                     f"Dr={dr}, S={s}")
  dtypes = tuple(x.dtype for x in arrays)
  if len(set(dtypes)) != 1 or not jnp.issubdtype(dtypes[0], jnp.floating):
    raise ValueError("latent_decode_attention: q_latent, q_rope, latent_cache, rope_cache must "
                     f"share one floating dtype; got {', '.join(map(str, dtypes))}")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"latent_decode_attention: lengths must be integer [B] = [{b}]; got "
                     f"{lengths.dtype}{list(lengths.shape)}")
  if num_splits is not None:
    if not isinstance(num_splits, int) or num_splits < 1:
      raise ValueError(f"latent_decode_attention: num_splits must be a positive int; got "
                       f"{num_splits!r}")
    if backend == "tpu" and num_splits != 1:
      raise ValueError("latent_decode_attention: num_splits is a Triton setting; the TPU kernel "
                       f"walks S sequentially per row; got num_splits={num_splits}")
  for name, value in launch.items():
    if value is not None and backend == "tpu":
      raise ValueError(f"latent_decode_attention: {name} is a Triton launch setting; got "
                       f"{name}={value} with backend='tpu'")


def _triton_block_s(block_s, s: int, r_pad: int, itemsize: int) -> int:
  if block_s is None:
    block_s = TRITON_MAX_BLOCK_S
    while block_s > 16 and block_s * r_pad * itemsize > TRITON_CACHE_TILE_BYTES:
      block_s //= 2
    # A short cache needs no more than one power-of-two block covering it.
    return min(block_s, max(16, 1 << (s - 1).bit_length()))
  if not isinstance(block_s, int) or block_s < 16 or block_s & (block_s - 1):
    raise ValueError(f"latent_decode_attention: triton block_s must be a power of two >= 16; "
                     f"got {block_s!r}")
  return block_s


def _tpu_block_s(block_s, s: int, interpret) -> int:
  if block_s is None:
    return s if s <= TPU_BLOCK_S else TPU_BLOCK_S
  if not isinstance(block_s, int) or block_s < 8 or block_s % 8:
    raise ValueError(f"latent_decode_attention: tpu block_s must be a multiple of 8; got "
                     f"{block_s!r}")
  if block_s >= s:
    return s                        # one block covering S: a full dim is always a legal tile
  if not interpret and block_s % 128:
    raise ValueError(f"latent_decode_attention: tpu block_s must be a multiple of 128 (Mosaic's "
                     f"lane width) when shorter than the cache length {s}; got {block_s}")
  return block_s


def default_num_splits(batch: int, head_blocks: int, n_blocks: int) -> int:
  """S splits so that batch x head blocks x splits fills the GPU, never more than S blocks."""
  return max(1, min(n_blocks, _cdiv(GPU_SM_COUNT, batch * head_blocks)))


# The kernels have no backward; this custom_vjp makes jax.grad fail with a clear message
# instead of an obscure one from inside pallas_call. fn (the configured kernel) is static.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _no_grad(fn, *args):
  return fn(*args)


def _no_grad_fwd(fn, *args):
  return fn(*args), None


def _no_grad_bwd(fn, res, g):
  raise NotImplementedError(
      "latent_decode_attention: the 'triton' and 'tpu' decode kernels are inference-only and "
      "have no gradient; differentiate backend='xla' instead")


_no_grad.defvjp(_no_grad_fwd, _no_grad_bwd)


def latent_decode_attention(q_latent, q_rope, latent_cache, rope_cache, lengths, *,
                            sm_scale: float, backend: str | None = None, interpret=False,
                            block_s: int | None = None, num_splits: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None):
  """One decode step of absorbed MLA attention over the latent cache; [B, H, R] in q's dtype.

  q_latent [B, H, R]: per-head q_nope @ W_uk; q_rope [B, H, Dr]: rotated rope query;
  latent_cache [B, S, R]: normed latents c; rope_cache [B, S, Dr]: rotated shared rope keys;
  lengths [B] int: row b attends to cache positions j < lengths[b] (clipped to [0, S]).
  Returns o[b, h] = sum_j softmax_j((q_latent.c_j + q_rope.k_r_j) * sm_scale) c_j with f32
  softmax and accumulation, still in latent space (the caller applies W_uv and o_proj).
  Positions j >= lengths[b] are never read into the result (they may hold NaN); a row with
  lengths[b] == 0 returns zeros.

  backend: None picks by platform (GPU: Pallas Triton, TPU: Pallas Mosaic, else XLA).
  interpret: run the chosen kernel on CPU (Triton: Pallas' interpreter; TPU: TPU semantics via
  `pltpu.InterpretParams`, or pass an InterpretParams yourself).
  block_s: cache positions per block (triton: power of two >= 16, default <= 64 sized to a 64 KiB
  tile; tpu: S or a multiple of 128, default 512). num_splits (triton only): flash-decoding
  splits of S per row, default enough programs for ~132 SMs. num_warps / num_stages: Triton
  launch settings (default 4 / 2).
  Inference only: the kernel backends raise NotImplementedError under jax.grad / jax.vjp;
  backend='xla' is plain XLA and differentiable. All backends work under jax.jit.
  """
  backend = resolve_backend("latent_decode_attention", backend, interpret)
  _check(q_latent, q_rope, latent_cache, rope_cache, lengths, backend, interpret, num_splits,
         dict(num_warps=num_warps, num_stages=num_stages))
  sm_scale = float(sm_scale)
  b, h, r = q_latent.shape
  s, dr = latent_cache.shape[1], q_rope.shape[-1]
  lengths = jnp.clip(lengths, 0, s).astype(jnp.int32)
  if backend == "xla":
    return reference_latent_decode_attention(q_latent, q_rope, latent_cache, rope_cache, lengths,
                                             sm_scale=sm_scale)

  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    from pallas_kernels.decode_attention import tpu as module
    interp = (pltpu.InterpretParams() if interpret is True else interpret) or False
    fn = functools.partial(module.decode, sm_scale=sm_scale, interpret=interp,
                           block_s=_tpu_block_s(block_s, s, interpret))
    return _no_grad(fn, q_latent, q_rope, latent_cache, rope_cache, lengths)

  from pallas_kernels.decode_attention import triton as module
  # Dots need every dim >= 16: pad heads (cheap, queries only) to whole head blocks and R / Dr
  # to multiples of 16 (zero columns add nothing to q.c; the real models' 512 / 64 need none).
  hp = _cdiv(h, TRITON_HEAD_BLOCK) * TRITON_HEAD_BLOCK
  rp, drp = _cdiv(r, 16) * 16, _cdiv(dr, 16) * 16
  pad = lambda x, rows, cols: jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])))
  args = (pad(q_latent, hp, rp), pad(q_rope, hp, drp), pad(latent_cache, s, rp),
          pad(rope_cache, s, drp), lengths[:, None])
  bs = _triton_block_s(block_s, s, rp, jnp.dtype(q_latent.dtype).itemsize)
  splits = num_splits or default_num_splits(b, hp // TRITON_HEAD_BLOCK, _cdiv(s, bs))
  fn = functools.partial(
      module.decode, sm_scale=sm_scale, block_h=TRITON_HEAD_BLOCK, block_s=bs, num_splits=splits,
      num_warps=num_warps or TRITON_NUM_WARPS, num_stages=num_stages or TRITON_NUM_STAGES,
      interpret=bool(interpret))
  out = _no_grad(fn, *args)
  return out[:, :h, :r].astype(q_latent.dtype)
