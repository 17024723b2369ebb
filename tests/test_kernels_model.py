"""The Pallas kernels inside the model: logits and every parameter gradient through the kernel
paths (interpret mode on CPU) equal the XLA reference paths, on packed rows of several documents.
Also: what `auto` resolves to, and the expert-parallel path with the kernel as local experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coder_jax.model import get_attention_impl, get_config, get_moe_impl, init_model

CFG = get_config("tiny", num_hidden_layers=2, dtype="float32", param_dtype="float32",
                 attention_impl="reference", moe_impl="reference")
B, T = 2, 21


def _batch(seed):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(3, CFG.vocab_size, (B, T)), jnp.int32)
  seg = jnp.asarray(np.sort(rng.integers(1, 4, (B, T)), axis=1), jnp.int32)
  cot = jnp.asarray(rng.standard_normal((B, T, CFG.vocab_size)), jnp.float32)
  return ids, seg, cot


def _logits_and_grads(cfg, ids, seg, cot):
  graphdef, state = nnx.split(init_model(cfg, seed=3))

  def loss(state):
    logits = nnx.merge(graphdef, state)(ids, seg)
    return jnp.sum(logits * cot), logits

  # One compiled program (interpreted kernels are large HLO: cheap LLVM passes halve the compile).
  fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
               compiler_options={"xla_backend_optimization_level": 0,
                                 "xla_llvm_disable_expensive_passes": True})
  with jax.default_matmul_precision("highest"):   # no TF32 in the reference on a GPU
    (_, logits), grads = fn(state)
  return logits, jax.tree.leaves(grads)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_model_with_kernels_matches_reference(impl):
  ids, seg, cot = _batch(0)
  want_logits, want_grads = _logits_and_grads(CFG, ids, seg, cot)
  got_logits, got_grads = _logits_and_grads(CFG.replace(attention_impl=impl, moe_impl=impl),
                                            ids, seg, cot)
  assert _rel(got_logits, want_logits) <= 1e-5
  assert len(got_grads) == len(want_grads)
  worst = max(_rel(g, w) for g, w in zip(got_grads, want_grads))
  assert worst <= 1e-5, worst


def test_auto_resolves_per_platform(monkeypatch):
  """On CPU `auto` is the XLA attention and the tiled expert scan; on GPU / TPU the kernels."""
  calls = []
  from coder_jax.model import attention, moe
  for name in ("reference", "tiled", "pallas"):
    monkeypatch.setitem(attention._ATTENTION_IMPLS._impls, name,
                        lambda *a, _n=name, **k: calls.append(("attn", _n)))
    monkeypatch.setitem(moe._MOE_IMPLS._impls, name,
                        lambda *a, _n=name, **k: calls.append(("moe", _n)))
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  get_attention_impl("auto")()
  get_moe_impl("auto")()
  assert calls == [("attn", "reference"), ("moe", "tiled")]
  calls.clear()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  get_attention_impl("auto")()
  get_moe_impl("auto")()
  assert calls == [("attn", "pallas"), ("moe", "pallas")]


def test_kernel_backend_interprets_off_platform(monkeypatch):
  from coder_jax.model.kernels import kernel_backend
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert kernel_backend(None) == ("triton", True)          # CPU: the GPU kernel, interpreted
  assert kernel_backend("tpu") == ("tpu", True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert kernel_backend(None) == ("triton", False)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert kernel_backend(None) == ("tpu", False)


def test_pallas_attention_rejects_cross_attention():
  q = jnp.ones((1, 8, 2, 16))
  seg = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(NotImplementedError, match="self-attention only"):
    get_attention_impl("pallas")(q, q, q, q_segment_ids_BT=seg, kv_segment_ids_BS=seg + 0,
                                 scale=0.25)


def test_expert_parallel_with_kernel_experts():
  """shard_map over fsdp2 x expert2 with the Triton grouped matmul as the local experts."""
  from coder_jax.model.moe import route
  from coder_jax.parallel.expert import experts_forward
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  cfg = get_config("tiny", moe_impl="pallas_triton")
  rng = np.random.default_rng(4)
  e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  x = jnp.asarray(rng.standard_normal((32, d)), jnp.float32)
  w = [jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for s in ((e, d, f), (e, d, f),
                                                                     (e, f, d))]
  r = route(x @ jnp.asarray(rng.standard_normal((d, e)), jnp.float32), cfg)
  aff = jnp.take_along_axis(r.scores_NE, r.experts_NK, axis=-1)
  args = (x, r.experts_NK, r.weights_NK, aff, *w)
  want = get_moe_impl("reference")(x, r.experts_NK, r.weights_NK, *w, dtype=jnp.float32)
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2), jax.devices()[:4])
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: experts_forward(cfg, *a, impl=get_moe_impl("pallas_triton"),
                                             dtype=jnp.float32))(*args)
  assert _rel(got, want) <= 1e-5


def test_attention_kernel_runs_per_shard_under_a_mesh():
  """Under a data x fsdp x tensor mesh the kernel runs inside shard_map on each device's rows
  and heads (XLA cannot partition a pallas_call); logits equal the unsharded reference."""
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  from coder_jax.train.state import param_specs, to_shardings
  ids, seg, _ = _batch(1)
  ids, seg = jnp.concatenate([ids, ids[::-1]]), jnp.concatenate([seg, seg[::-1]])   # 4 rows
  model = init_model(CFG, seed=3)
  want = model(ids, seg)
  graphdef, state = nnx.split(model.__class__(CFG.replace(attention_impl="pallas_triton"),
                                              rngs=nnx.Rngs(params=3)))
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  params = jax.device_put(nnx.to_pure_dict(state), to_shardings(param_specs(state, mesh), mesh))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, i, s: nnx.merge(graphdef, p)(i, s))
    got = fn(params, ids, seg)
    text = fn.lower(params, ids, seg).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert _rel(got, want) <= 1e-5
