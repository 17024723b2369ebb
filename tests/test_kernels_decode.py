"""pallas_kernels.decode_attention: the latent-cache decode kernels (interpret mode) against the
XLA reference.

One test body runs on each backend: the Triton kernel through Pallas' interpreter and the TPU
kernel with TPU semantics (`pltpu.InterpretParams`), both under jax.jit. Shapes have S not a
multiple of the block, per-row lengths including 0, 1 and S, H below 16 and not a power of two,
MLA's real R / Dr (512 / 64) and small odd ones, several S splits, and NaN / huge garbage in the
cache past each row's length. The real GPU / TPU lowerings are checked by lowering for those
platforms from this CPU machine.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (latent_decode_attention,
                                             reference_latent_decode_attention)
from pallas_kernels.decode_attention.api import default_num_splits

BACKENDS = ["triton", "tpu"]
# On a GPU (or TPU) the same tests run that backend's kernel natively.
INTERPRET = {"triton": jax.default_backend() != "gpu", "tpu": jax.default_backend() != "tpu"}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def inputs(seed, b, h, r, dr, s, lengths, garbage, dtype):
  """Random queries and caches whose slots at or past lengths[b] hold `garbage`."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q_lat, q_rope, c, kr = draw(b, h, r), draw(b, h, dr), draw(b, s, r), draw(b, s, dr)
  for row, n in enumerate(lengths):
    c[row, n:] = kr[row, n:] = garbage
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q_lat), cast(q_rope), cast(c), cast(kr), jnp.asarray(lengths, jnp.int32)


def run(backend, args, sm_scale, **kw):
  fn = lambda *a: latent_decode_attention(*a, sm_scale=sm_scale, backend=backend,
                                          interpret=INTERPRET[backend], **kw)
  return jax.jit(fn)(*args)


def reference(args, sm_scale):
  up = lambda x: x.astype(jnp.float32)
  *arrays, lengths = args
  return reference_latent_decode_attention(*map(up, arrays), lengths, sm_scale=sm_scale)


# (seed, B, H, R, Dr, S, lengths, garbage, triton (block_s, num_splits), tpu block_s); None: default.
CASES = [
    (0, 3, 5, 40, 8, 75, [1, 75, 37], np.nan, (16, 3), 16),
    (1, 2, 3, 512, 64, 150, [150, 61], np.nan, (32, 2), 128),   # split 2 of row 1 is empty
    (2, 4, 16, 24, 16, 33, [0, 1, 33, 20], 3e38, (None, None), None),
    (3, 1, 20, 48, 16, 200, [129], -np.inf, (16, 5), 64),        # two Triton head blocks
]


def check_case(backend, case, dtype, tol):
  seed, b, h, r, dr, s, lengths, garbage, (tri_bs, tri_splits), tpu_bs = case
  args = inputs(seed, b, h, r, dr, s, lengths, garbage, dtype)
  scale = 0.5 / np.sqrt(r + dr)
  kw = (dict(block_s=tri_bs, num_splits=tri_splits) if backend == "triton"
        else dict(block_s=tpu_bs))
  got = run(backend, args, scale, **kw)
  want = reference(args, scale)
  assert got.shape == (b, h, r) and got.dtype == dtype
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  assert rel_err(got, want) <= tol, rel_err(got, want)
  for row, n in enumerate(lengths):
    if n == 0:
      assert np.all(np.asarray(got[row], np.float32) == 0.0), "lengths 0 must give zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}")
def test_float32_matches_reference(backend, case):
  check_case(backend, case, jnp.float32, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_matches_float32_reference(backend):
  # MLA's real R / Dr, a ragged S, H = 12, huge garbage past the lengths.
  case = (7, 2, 12, 512, 64, 100, [100, 45], 1e30, (32, 2), 32)
  check_case(backend, case, jnp.bfloat16, 2e-2)


def test_xla_backend_matches_float64_numpy():
  lengths = [5, 0, 17]
  args = inputs(12, 3, 4, 24, 8, 17, lengths, np.nan, jnp.float32)
  got = latent_decode_attention(*args, sm_scale=0.3, backend="xla")
  q_lat, q_rope, c, kr = (np.asarray(x, np.float64) for x in args[:4])
  want = np.zeros(q_lat.shape)
  for row, n in enumerate(lengths):
    if n:
      logits = (q_lat[row] @ c[row, :n].T + q_rope[row] @ kr[row, :n].T) * 0.3
      p = np.exp(logits - logits.max(-1, keepdims=True))
      want[row] = (p / p.sum(-1, keepdims=True)) @ c[row, :n]
  assert np.all(np.asarray(got)[1] == 0.0)
  if jax.default_backend() == "cpu":   # backend=None picks XLA off GPU / TPU
    np.testing.assert_array_equal(latent_decode_attention(*args, sm_scale=0.3), got)
  assert rel_err(got, want) <= 1e-5


def test_lengths_are_clipped_to_the_cache():
  """lengths past S (or negative) mean the whole cache (or nothing), on every backend."""
  args = inputs(13, 2, 3, 16, 16, 20, [20, 0], 0.0, jnp.float32)
  args = (*args[:4], jnp.asarray([99, -4], jnp.int32))
  want = reference(args[:4] + (jnp.asarray([20, 0], jnp.int32),), 0.25)
  for backend in BACKENDS:
    assert rel_err(run(backend, args, 0.25), want) <= 1e-5, backend


@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_kernels_refuse_gradients_clearly(backend):
  args = inputs(14, 1, 2, 16, 16, 16, [9], 0.0, jnp.float32)
  loss = lambda q: latent_decode_attention(q, *args[1:], sm_scale=0.2, backend=backend,
                                           interpret=True).sum()
  with pytest.raises(NotImplementedError, match="inference-only"):
    jax.eval_shape(jax.grad(loss), args[0])    # raised while tracing the backward pass
  xla_loss = lambda q: latent_decode_attention(q, *args[1:], sm_scale=0.2, backend="xla").sum()
  assert np.all(np.isfinite(jax.grad(xla_loss)(args[0])))


@pytest.mark.parametrize("bad, msg", [
    (dict(q=(2, 4)), "must all be rank 3"),
    (dict(q_rope=(2, 4, 8)), "q_rope must be \\[B, H, Dr\\]"),
    (dict(cache=(2, 10, 32)), "latent_cache must be \\[B, S, R\\] with B=2, R=16"),
    (dict(rope=(2, 9, 8)), "rope_cache must be \\[B, S, Dr\\] = \\(2, 10, 8\\)"),
    (dict(cache=(2, 0, 16), rope=(2, 0, 8)), "S must be >= 1"),
    (dict(dtype_cache=jnp.bfloat16), "share one floating dtype"),
    (dict(dtype_all=jnp.int32), "share one floating dtype"),
    (dict(lengths=(2, 1)), "lengths must be integer \\[B\\] = \\[2\\]"),
    (dict(lengths_dtype=jnp.float32), "lengths must be integer"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(backend="xla", interpret=True),
     "interpret=True needs a kernel backend: pass backend='triton' or 'tpu'"),
    (dict(backend="triton", block_s=24), "triton block_s must be a power of two >= 16; got 24"),
    (dict(backend="triton", block_s=8), "power of two >= 16; got 8"),
    (dict(backend="triton", num_splits=0), "num_splits must be a positive int; got 0"),
    (dict(backend="tpu", num_splits=2), "num_splits is a Triton setting"),
    (dict(backend="tpu", num_warps=8), "num_warps is a Triton launch setting"),
    (dict(backend="tpu", block_s=12), "tpu block_s must be a multiple of 8; got 12"),
    (dict(backend="tpu", interpret=False, cache=(2, 300, 16), rope=(2, 300, 8), block_s=64),
     "multiple of 128 \\(Mosaic's lane width\\) when shorter than the cache length 300; got 64"),
])
def test_bad_inputs_raise_clear_errors(bad, msg):
  dtype = bad.get("dtype_all", jnp.float32)
  q = jnp.ones(bad.get("q", (2, 3, 16)), dtype)
  q_rope = jnp.ones(bad.get("q_rope", (2, 3, 8)), dtype)
  cache = jnp.ones(bad.get("cache", (2, 10, 16)), bad.get("dtype_cache", dtype))
  rope = jnp.ones(bad.get("rope", (2, 10, 8)), dtype)
  lengths = jnp.ones(bad.get("lengths", (2,)), bad.get("lengths_dtype", jnp.int32))
  with pytest.raises(ValueError, match=msg):
    latent_decode_attention(q, q_rope, cache, rope, lengths, sm_scale=0.1,
                            backend=bad.get("backend", "triton"),
                            interpret=bad.get("interpret", True), block_s=bad.get("block_s"),
                            num_splits=bad.get("num_splits"), num_warps=bad.get("num_warps"))


def test_default_splits_fill_the_gpu():
  assert default_num_splits(64, 1, 64) == 3       # 192 programs for 132 SMs
  assert default_num_splits(1, 1, 64) == 64       # batch 1: one split per S block
  assert default_num_splits(1, 1, 5) == 5
  assert default_num_splits(256, 1, 64) == 1


@pytest.mark.parametrize("backend, platform, call", [
    ("triton", "cuda", r"custom_call @__gpu\$xla\.gpu\.triton"),
    ("tpu", "tpu", r"custom_call @tpu_custom_call"),
])
def test_kernels_lower_for_their_hardware(backend, platform, call, cpu_as_tpu_v5p):
  """The serving shape (B64 H16 R512 Dr64 S4096 bf16) lowers to one real Triton / Mosaic kernel:
  the compiler front end accepts every block shape and op, and no [B, H, S] scores are left to
  XLA."""
  b, h, r, dr, s = 64, 16, 512, 64, 4096
  sd = jax.ShapeDtypeStruct
  args = (sd((b, h, r), jnp.bfloat16), sd((b, h, dr), jnp.bfloat16), sd((b, s, r), jnp.bfloat16),
          sd((b, s, dr), jnp.bfloat16), sd((b,), jnp.int32))
  fn = lambda *a: latent_decode_attention(*a, sm_scale=0.1, backend=backend)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert len(re.findall(call, text)) == 1
  assert f"{b}x{h}x{s}" not in text
  if backend == "triton":   # grid (B, head blocks, default splits)
    assert re.search(r"grid_x = 64 : i32, grid_y = 1 : i32, grid_z = 3 : i32", text)
