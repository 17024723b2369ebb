"""pallas_kernels.mla_attention: every kernel backend (interpret mode) against the XLA reference.

One test body runs on each backend: the Triton kernel through Pallas' interpreter and the TPU
kernel with TPU semantics (`pltpu.InterpretParams`). Forward and all three gradients, with a
random cotangent, on shapes where T is not a multiple of the block, Dqk != Dv and rows hold
several packed documents. The real GPU / TPU lowerings are checked by lowering for those
platforms from this CPU machine.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import BlockSizes, mla_attention, reference_attention

BACKENDS = ["triton", "tpu"]
# On a GPU (or TPU) the same tests run that backend's kernel natively.
INTERPRET = {"triton": jax.default_backend() != "gpu", "tpu": jax.default_backend() != "tpu"}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def packed_segments(rng, b, t, max_docs):
  """Sorted segment ids with 1..max_docs documents per row (so every row is packed)."""
  out = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), size=rng.integers(0, max_docs), replace=False))
    out[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
  return jnp.asarray(out)


def inputs(seed, b, t, h, dqk, dv, dtype, segments):
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, t, h, dqk), (b, t, h, dqk), (b, t, h, dv), (b, t, h, dv)))
  seg = packed_segments(rng, b, t, 4) if segments else None
  return q, k, v, do, seg


def fwd_and_grads(fn, q, k, v, do):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out, *pullback(do))


# (seed, B, T, H, Dqk, Dv, causal, segments, blocks): T is never a multiple of the 16-row block.
CASES = [
    (0, 2, 37, 2, 24, 16, True, True, 16),
    (1, 1, 50, 3, 40, 24, True, False, 16),
    (2, 2, 29, 1, 32, 8, False, True, 16),
    (3, 1, 70, 2, 16, 32, False, False, 32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}")
def test_float32_matches_reference(backend, case):
  seed, b, t, h, dqk, dv, causal, segments, blk = case
  q, k, v, do, seg = inputs(seed, b, t, h, dqk, dv, jnp.float32, segments)
  scale = 0.7 / np.sqrt(dqk)
  kern = lambda q, k, v: mla_attention(q, k, v, segment_ids=seg, causal=causal, sm_scale=scale,
                                       backend=backend, interpret=INTERPRET[backend],
                                       block_sizes=BlockSizes(blk, blk, blk, blk))
  ref = lambda q, k, v: reference_attention(q, k, v, segment_ids=seg, causal=causal,
                                            sm_scale=scale)
  got = fwd_and_grads(kern, q, k, v, do)
  with jax.default_matmul_precision("highest"):   # no TF32 in the reference on a GPU
    want = fwd_and_grads(ref, q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_matches_float32_reference(backend):
  # MLA's head dims (192 / 128) at a small T and a ragged length, with packed documents.
  q, k, v, do, seg = inputs(7, 1, 45, 2, 192, 128, jnp.bfloat16, True)
  kern = lambda q, k, v: mla_attention(q, k, v, segment_ids=seg, backend=backend,
                                       interpret=INTERPRET[backend],
                                       block_sizes=BlockSizes(16, 32, 32, 16))
  up = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: reference_attention(up(q), up(k), up(v), segment_ids=seg)
  got = fwd_and_grads(kern, q, k, v, do)
  with jax.default_matmul_precision("highest"):
    want = fwd_and_grads(ref, q, k, v, up(do))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16, name
    assert rel_err(g, w) <= 2e-2, (name, rel_err(g, w))


def test_default_blocks_and_default_scale():
  """Default block sizes shrink to a short sequence; sm_scale defaults to Dqk^-1/2."""
  q, k, v, do, _ = inputs(11, 1, 19, 2, 48, 16, jnp.float32, False)
  for backend in BACKENDS:
    got = mla_attention(q, k, v, backend=backend, interpret=INTERPRET[backend])
    with jax.default_matmul_precision("highest"):
      want = reference_attention(q, k, v)
    assert rel_err(got, want) <= 1e-5, backend


def test_xla_backend_matches_float64_numpy():
  q, k, v, _, seg = inputs(12, 2, 21, 2, 12, 8, jnp.float32, True)
  got = mla_attention(q, k, v, segment_ids=seg, backend="xla")
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  logits = np.einsum("bthk,bshk->bhts", qn, kn) / np.sqrt(12)
  t = q.shape[1]
  mask = (sn[:, :, None] == sn[:, None, :]) & np.tril(np.ones((t, t), bool))[None]
  logits = np.where(mask[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhts,bshv->bthv", p / p.sum(-1, keepdims=True), vn)
  assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("bad, msg", [
    (dict(q=(2, 8, 4)), "must be \\[B, T, H, D\\]"),
    (dict(k=(2, 7, 2, 16)), "k must be \\[B, S, H, D\\] with q's B, H, D and S >= T"),
    (dict(v=(2, 8, 3, 8)), "v must be \\[B, S, H, Dv\\]"),
    (dict(dtype_v=jnp.bfloat16), "share one floating dtype"),
    (dict(seg=(2, 9)), "segment_ids must be integer \\[B, S\\]"),
    (dict(seg_dtype=jnp.float32), "segment_ids must be integer"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(backend="xla", interpret=True),
     "interpret=True needs a kernel backend: pass backend='triton' or 'tpu'"),
    (dict(backend="triton", blocks=BlockSizes(24, 16, 16, 16)), "power of two >= 16; got 24"),
    (dict(backend="tpu", blocks=BlockSizes(16, 12, 16, 16)), "multiple of 8; got 12"),
    (dict(backend="tpu", interpret=False, q=(2, 300, 2, 16), blocks=BlockSizes(128, 64, 128, 128)),
     "block_k must be a multiple of 128 \\(Mosaic's lane width\\) when shorter than the "
     "padded sequence 384; got 64"),
])
def test_bad_inputs_raise_clear_errors(bad, msg):
  q = jnp.ones(bad.get("q", (2, 8, 2, 16)))
  k = jnp.ones(bad.get("k", q.shape))
  v = jnp.ones(bad.get("v", q.shape[:3] + (8,)), bad.get("dtype_v", jnp.float32))
  seg = jnp.ones(bad.get("seg", q.shape[:2]), bad.get("seg_dtype", jnp.int32))
  with pytest.raises(ValueError, match=msg):
    mla_attention(q, k, v, segment_ids=seg, backend=bad.get("backend", "triton"),
                  interpret=bad.get("interpret", True), block_sizes=bad.get("blocks"))


@pytest.mark.parametrize("backend, platform, call", [
    ("triton", "cuda", r"custom_call @__gpu\$xla\.gpu\.triton"),
    ("tpu", "tpu", r"custom_call @tpu_custom_call"),
])
@pytest.mark.parametrize("t", [4096, 1000])
def test_kernels_lower_for_their_hardware(backend, platform, call, t, cpu_as_tpu_v5p):
  """Forward and backward of the benchmark shape (B2 H16 192/128 bf16) and a ragged T lower
  to the real Triton / Mosaic kernels: every block shape and op is accepted by the compiler
  front end, and no XLA attention is left in the graph."""
  q = jax.ShapeDtypeStruct((2, t, 16, 192), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, t, 16, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def loss(q, k, v, seg):
    return mla_attention(q, k, v, segment_ids=seg, backend=backend).astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, v, seg).lower(
      lowering_platforms=(platform,)).as_text()
  assert len(re.findall(call, text)) == 3   # forward, dK/dV, dQ
  assert f"{t}x{t}" not in text    # no [.., T, T] scores outside the kernels


def test_segment_spans_match_numpy():
  """The kernels skip key blocks outside each block's segment spans; the spans are the
  first / last occurrence of each position's id, for any ids (not only contiguous runs)."""
  from pallas_kernels.attention.spans import segment_spans
  seg = np.random.default_rng(13).integers(0, 5, (3, 40)).astype(np.int32)
  first, last = (np.asarray(a) for a in segment_spans(jnp.asarray(seg)))
  for b in range(3):
    for t in range(40):
      where = np.flatnonzero(seg[b] == seg[b, t])
      assert (first[b, t], last[b, t]) == (where[0], where[-1])


def _small_blocks_kernel(seg, causal, backend):
  """The kernel at 16 x 16 blocks (many blocks at short lengths) as a function of q, k, v."""
  return lambda q, k, v: mla_attention(q, k, v, segment_ids=seg, causal=causal, backend=backend,
                                       interpret=INTERPRET[backend],
                                       block_sizes=BlockSizes(16, 16, 16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_many_short_and_scattered_segments(backend, causal):
  """Block skipping by segment spans stays exact: many short documents (most key blocks are
  skipped) and ids that recur far apart (spans cover the gap)."""
  rng = np.random.default_rng(21)
  q, k, v, do, _ = inputs(22, 2, 75, 2, 16, 16, jnp.float32, False)
  short = np.repeat(np.arange(1, 20), 4)[:75]
  scattered = rng.integers(1, 4, 75)
  seg = jnp.asarray(np.stack([short, scattered]).astype(np.int32))
  kern = _small_blocks_kernel(seg, causal, backend)
  got = fwd_and_grads(kern, q, k, v, do)
  with jax.default_matmul_precision("highest"):
    want = fwd_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg,
                                                              causal=causal), q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))


def test_backend_rule(monkeypatch):
  """One rule for every kernel: None picks the platform's kernel; interpret needs a kernel."""
  from pallas_kernels.backends import resolve_backend
  for platform, want in (("gpu", "triton"), ("tpu", "tpu"), ("cpu", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
    assert resolve_backend("op", None, False) == want
  assert resolve_backend("op", "tpu", True) == "tpu"
  with pytest.raises(ValueError, match="op: interpret=True needs a kernel backend"):
    resolve_backend("op", None, True)
  with pytest.raises(ValueError, match="op: unknown backend 'mosaic'"):
    resolve_backend("op", "mosaic", False)


# (seed, B, S keys, T queries, causal, segments): the queries are the last T of the S positions
# (a context-parallel chunk); offset and lengths are not block multiples. With segments, row 0
# starts with keys of an id no query has, as model/context.py hides wrapped-around keys.
SHORT_Q_CASES = [(30, 1, 45, 13, True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SHORT_Q_CASES, ids=lambda c: f"seed{c[0]}")
def test_queries_shorter_than_keys(backend, case):
  """q [B, T] against k, v [B, S > T]: equal to the full-length reference with random queries
  in the first S - T rows and a zero cotangent there, its last T rows (out, dq) and dk, dv."""
  seed, b, s, t, causal, segments = case
  q_all, k, v, do_all, seg = inputs(seed, b, s, 2, 24, 16, jnp.float32, segments)
  q, do = q_all[:, s - t:], do_all[:, s - t:]
  if segments:
    seg = seg.at[0, :s - t - 5].set(-1)
  kern = _small_blocks_kernel(seg, causal, backend)
  got = fwd_and_grads(kern, q, k, v, do)
  with jax.default_matmul_precision("highest"):
    full = fwd_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg,
                                                              causal=causal),
                         q_all, k, v, do_all.at[:, :s - t].set(0))
    short = fwd_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids=seg,
                                                               causal=causal), q, k, v, do)
  want = (full[0][:, s - t:], full[1][:, s - t:], full[2], full[3])
  for name, g, w, r in zip(("out", "dq", "dk", "dv"), got, want, short):
    assert g.shape == w.shape, name
    assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))
    assert rel_err(r, w) <= 1e-5, ("reference", name, rel_err(r, w))
