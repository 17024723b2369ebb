"""pallas_kernels.baselines (cuDNN pad/slice, tokamax adapters or their error) and the smoke run
of benchmarks/kernels.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import baselines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_attention(q, k, v, *, scale, causal, segment_ids=None):
  """float64 softmax(q k^T * scale, masked) v; q, k [B,T,H,Dqk], v [B,T,H,Dv]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  t = q.shape[1]
  s = np.einsum("bthd,bshd->bhts", q, k) * scale
  keep = np.ones((q.shape[0], 1, t, t), bool)
  if causal:
    keep &= np.tril(np.ones((t, t), bool))
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    keep &= (seg[:, :, None] == seg[:, None, :])[:, None]
  s = np.where(keep, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def np_grouped_matmul(lhs, rhs, group_sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, n in enumerate(np.asarray(group_sizes)):
    out[start:start + n] = lhs[start:start + n] @ rhs[g]
    start += n
  return out


def qkv(b=2, t=16, h=2, dqk=24, dv=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, dqk)), jax.random.normal(ks[1], (b, t, h, dqk)),
          jax.random.normal(ks[2], (b, t, h, dv)))


# Two packed rows: three segments, then one segment with a padding tail of its own id.
SEGMENTS = jnp.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 12 + [0] * 4], jnp.int32)


@pytest.mark.parametrize("dqk,dv", [(24, 16), (8, 16), (16, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_adapter_pad_and_slice(dqk, dv, causal):
  # cuDNN itself needs a GPU; "xla" runs the same padded call and the slice on CPU.
  q, k, v = qkv(dqk=dqk, dv=dv)
  out = baselines.cudnn_attention(q, k, v, causal=causal, implementation="xla")
  assert out.shape == (2, 16, 2, dv)
  want = np_attention(q, k, v, scale=dqk ** -0.5, causal=causal)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_cudnn_adapter_explicit_scale_and_segments_on_xla():
  q, k, v = qkv()
  out = baselines.cudnn_attention(q, k, v, segment_ids=SEGMENTS, causal=True, sm_scale=0.3,
                                  implementation="xla")
  want = np_attention(q, k, v, scale=0.3, causal=True, segment_ids=SEGMENTS)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_cudnn_adapter_gradients_through_the_pad():
  q, k, v = qkv(t=8)
  ct = jax.random.normal(jax.random.key(5), (2, 8, 2, 16))

  def loss(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)

  got = loss(lambda q, k, v: baselines.cudnn_attention(q, k, v, implementation="xla"))

  def dense(q, k, v):  # the same attention with no padding, by hand
    s = jnp.einsum("bthd,bshd->bhts", q, k) * 24 ** -0.5
    s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v)

  for g, w in zip(got, loss(dense)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_cudnn_adapter_refuses_segment_ids():
  q, k, v = qkv()
  with pytest.raises(NotImplementedError, match="segment ids"):
    baselines.cudnn_attention(q, k, v, segment_ids=SEGMENTS)


def test_segment_mask_layout():
  m = baselines.segment_mask(SEGMENTS)
  assert m.shape == (2, 1, 16, 16) and m.dtype == jnp.bool_
  assert bool(m[0, 0, 4, 0]) and not bool(m[0, 0, 5, 4]) and bool(m[1, 0, 13, 15])


def gmm_inputs():
  ks = jax.random.split(jax.random.key(3), 2)
  lhs = jax.random.normal(ks[0], (24, 8))
  rhs = jax.random.normal(ks[1], (4, 8, 6))
  # An empty group, and 3 rows past the sum that must come back as zeros.
  return lhs, rhs, jnp.array([5, 0, 9, 7], jnp.int32)


def test_tokamax_adapters_or_their_error():
  """Against numpy where tokamax is importable; otherwise the error that names it."""
  q, k, v = qkv()
  lhs, rhs, gs = gmm_inputs()
  if not baselines.tokamax_available():
    for call in (lambda: baselines.tokamax_attention(q, k, v),
                 lambda: baselines.tokamax_grouped_matmul(lhs, rhs, gs),
                 lambda: baselines.tokamax_implementations("attention")):
      with pytest.raises(baselines.BaselineUnavailableError, match="tokamax") as e:
        call()
      assert isinstance(e.value, ImportError) and e.value.name == "tokamax"
    return
  assert baselines.tokamax_implementations("attention", "cpu") == ("xla",)
  assert "triton" in baselines.tokamax_implementations("ragged_dot", "gpu")
  out = baselines.tokamax_attention(q, k, v, segment_ids=SEGMENTS, causal=True,
                                    implementation="xla")
  want = np_attention(q, k, v, scale=24 ** -0.5, causal=True, segment_ids=SEGMENTS)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  out = baselines.tokamax_attention(q, k, v, causal=False, sm_scale=0.2, implementation="xla")
  np.testing.assert_allclose(out, np_attention(q, k, v, scale=0.2, causal=False),
                             atol=2e-5, rtol=2e-5)
  got = baselines.tokamax_grouped_matmul(lhs, rhs, gs, implementation="xla")
  np.testing.assert_allclose(got, np_grouped_matmul(lhs, rhs, gs), atol=1e-4, rtol=1e-5)
  assert not np.any(np.asarray(got[21:]))


def test_missing_tokamax_is_a_clear_import_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # makes `import tokamax` fail
  assert not baselines.tokamax_available()
  assert baselines.tokamax_version() is None
  q, k, v = qkv()
  with pytest.raises(ImportError, match="tokamax is not installed") as e:
    baselines.tokamax_attention(q, k, v)
  assert isinstance(e.value, baselines.BaselineUnavailableError) and e.value.name == "tokamax"
  with pytest.raises(baselines.BaselineUnavailableError, match="tokamax is not installed"):
    baselines.tokamax_grouped_matmul(*gmm_inputs())


def test_tokamax_with_a_missing_dependency_says_so(monkeypatch, tmp_path):
  # As tokamax 0.0.17 without xprof: the package is there, one of its imports is not.
  pkg = tmp_path / "tokamax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("import _coder_jax_absent_dependency\n")
  for name in [m for m in sys.modules if m == "tokamax" or m.startswith("tokamax.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert not baselines.tokamax_available()
  with pytest.raises(baselines.BaselineUnavailableError,
                     match="installed but failed to import.*_coder_jax_absent_dependency"):
    baselines.tokamax_attention(*qkv())


def test_benchmark_smoke_run():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernels.py"), "--smoke"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  for head in ("## Kernels", "jaxlib", "SMOKE RUN",
               "### Attention: B1 T64 H2 Dqk24 Dv16, causal, bf16",
               "| pass | ours | XLA | cuDNN (v padded) | tokamax",
               "### Grouped matmul: M128 K32 N48 G4", "| pass | ours | XLA | tokamax",
               "ceiling (batched einsum) |", "skewed group sizes",
               "### Train step", "| case | attention_impl | moe_impl |", "| tiny | auto | auto |"):
    assert head in out, f"{head!r} missing from:\n{out}"
  # The XLA columns need nothing but jax, so they must have produced numbers.
  rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith("| ")}
  assert "TFLOP/s" in rows["| balanced fwd"] and "TFLOP/s" in rows["| skewed fwd+bwd"]
