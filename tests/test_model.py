"""Model internals: routing against float64 numpy, expert implementations, packing, scan, remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coder_jax.model import (ConfigError, get_config, init_model, register_attention_impl,
                             route, segment_positions, xla_attention)
from coder_jax.model.moe import (dense_experts, gathered_experts, ragged_experts, slot_capacity,
                                 slotted_experts, tiled_experts)

TINY = get_config("tiny")


def _np_route(scores, k, method, n_group=1, topk_group=1, scale=1.0, norm=False):
  """float64 numpy transcription of the DeepSeek-V2 gate (independent of jax)."""
  n, e = scores.shape
  chosen = np.zeros((n, k), int)
  weights = np.zeros((n, k))
  for t in range(n):
    s = scores[t].copy()
    if method == "group_limited_greedy":
      best = s.reshape(n_group, -1).max(axis=1)
      keep = np.argsort(-best, kind="stable")[:topk_group]
      mask = np.zeros(n_group, bool)
      mask[keep] = True
      s = np.where(np.repeat(mask, e // n_group), s, 0.0)
    chosen[t] = np.argsort(-s, kind="stable")[:k]
    weights[t] = s[chosen[t]]
  if k > 1 and norm:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  else:
    weights = weights * scale
  return chosen, weights


@pytest.mark.parametrize("method,groups,scale,norm", [
    ("greedy", (1, 1), 1.0, False), ("greedy", (1, 1), 2.5, True),
    ("group_limited_greedy", (4, 2), 16.0, False), ("group_limited_greedy", (8, 3), 1.0, True)])
def test_router_matches_numpy(method, groups, scale, norm):
  cfg = get_config("tiny", n_routed_experts=16, num_experts_per_tok=4, topk_method=method,
                   n_group=groups[0], topk_group=groups[1], routed_scaling_factor=scale,
                   norm_topk_prob=norm)
  logits = np.random.default_rng(0).normal(size=(64, 16)) * 3
  r = route(jnp.asarray(logits, jnp.float32), cfg)
  scores = np.exp(logits - logits.max(-1, keepdims=True))
  scores /= scores.sum(-1, keepdims=True)
  chosen, weights = _np_route(scores, 4, method, *groups, scale=scale, norm=norm)
  np.testing.assert_allclose(np.asarray(r.scores_NE), scores, rtol=1e-5, atol=1e-7)
  order = np.argsort(np.asarray(r.experts_NK), axis=1)
  got_e = np.take_along_axis(np.asarray(r.experts_NK), order, 1)
  got_w = np.take_along_axis(np.asarray(r.weights_NK), order, 1)
  ref_order = np.argsort(chosen, axis=1)
  np.testing.assert_array_equal(got_e, np.take_along_axis(chosen, ref_order, 1))
  np.testing.assert_allclose(got_w, np.take_along_axis(weights, ref_order, 1), rtol=1e-5)
  if method == "group_limited_greedy":  # every chosen expert lies in one of the kept groups
    per_group = 16 // groups[0]
    assert all(len(set(row // per_group)) <= groups[1] for row in np.asarray(r.experts_NK))


def test_ragged_experts_match_dense_and_numpy():
  rng = np.random.default_rng(1)
  n, d, f, e, k = 50, 16, 8, 6, 2
  x = rng.normal(size=(n, d)).astype(np.float32)
  wg, wu = (rng.normal(size=(e, d, f)).astype(np.float32) * 0.3 for _ in range(2))
  wd = rng.normal(size=(e, f, d)).astype(np.float32) * 0.3
  experts = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
  weights = rng.uniform(size=(n, k)).astype(np.float32)
  args = [jnp.asarray(a) for a in (x, experts, weights, wg, wu, wd)]
  ragged = np.asarray(ragged_experts(*args, dtype=jnp.float32))
  dense = np.asarray(dense_experts(*args, dtype=jnp.float32))
  ref = np.zeros((n, d))
  for t in range(n):
    for j in range(k):
      i = experts[t, j]
      g, u = x[t] @ wg[i].astype(np.float64), x[t] @ wu[i].astype(np.float64)
      ref[t] += weights[t, j] * ((g / (1 + np.exp(-g)) * u) @ wd[i])
  np.testing.assert_allclose(ragged, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dense, ref, rtol=1e-4, atol=1e-5)
  gathered = np.asarray(gathered_experts(*args, dtype=jnp.float32))
  np.testing.assert_allclose(gathered, ref, rtol=1e-4, atol=1e-5)
  # One token (2 copies of 6 experts) takes the gathered path inside the tiled impl.
  one = [args[0][:1], args[1][:1], args[2][:1]] + args[3:]
  np.testing.assert_allclose(np.asarray(tiled_experts(*one, dtype=jnp.float32)), ref[:1],
                             rtol=1e-4, atol=1e-5)
  for tile in (1, 4, 128):  # tiles smaller than, near and larger than the groups
    tiled = np.asarray(tiled_experts(*args, dtype=jnp.float32, tile=tile))
    np.testing.assert_allclose(tiled, ref, rtol=1e-4, atol=1e-5)
  # Slots: 40 per expert hold every group (the largest has 24 copies); 8 do not, and the dense
  # product runs instead. Both exact.
  assert np.bincount(experts.ravel()).max() in range(9, 41) and slot_capacity(n, k, e) == 40
  for cap in (40, 8):
    slotted = np.asarray(jax.jit(functools.partial(slotted_experts, dtype=jnp.float32,
                                                   capacity=cap))(*args))
    np.testing.assert_allclose(slotted, ref, rtol=1e-4, atol=1e-5)
  unused = args[:1] + [jnp.zeros_like(args[1])] + args[2:]  # every copy to expert 0
  np.testing.assert_allclose(np.asarray(tiled_experts(*unused, dtype=jnp.float32, tile=8)),
                             np.asarray(dense_experts(*unused, dtype=jnp.float32)),
                             rtol=1e-4, atol=1e-5)


def test_attention_against_numpy_with_segments():
  rng = np.random.default_rng(2)
  b, t, h, dk, dv = 2, 9, 3, 5, 4
  q, k = rng.normal(size=(2, b, t, h, dk))
  v = rng.normal(size=(b, t, h, dv))
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 9])
  out = xla_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), q_segment_ids_BT=seg,
                      kv_segment_ids_BS=seg, scale=0.3)
  ref = np.zeros((b, t, h, dv))
  for bi in range(b):
    for i in range(t):
      ok = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
      for hi in range(h):
        s = np.array([q[bi, i, hi] @ k[bi, j, hi] * 0.3 for j in ok])
        p = np.exp(s - s.max())
        ref[bi, i, hi] = (p / p.sum()) @ v[bi, ok, hi]
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_packed_rows_equal_documents_alone():
  model = init_model(TINY, seed=1)
  rng = np.random.default_rng(3)
  docs = [rng.integers(0, TINY.vocab_size, n) for n in (7, 12, 5)]
  ids = np.concatenate(docs + [np.zeros(4, int)])[None]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(4, int)])
  fwd = nnx.jit(lambda m, i, s=None: m(i, s))
  packed = np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(seg[None])))
  start = 0
  for d in docs:
    alone = np.asarray(fwd(model, jnp.asarray(d[None])))
    np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], rtol=1e-5, atol=1e-5)
    start += len(d)
  np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(seg[None])))[0],
                                np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(4)]))


def test_router_stats_exclude_padding():
  model = init_model(TINY, seed=1)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 512, (2, 10)))
  seg = jnp.asarray([[1] * 6 + [0] * 4, [1] * 3 + [2] * 7])
  _, aux = model(ids, seg, return_aux=True)
  (stats,) = aux["router"]
  np.testing.assert_array_equal(np.asarray(stats["tokens"]), [[6, 10], [6, 10]])
  np.testing.assert_allclose(np.asarray(stats["count"]).sum(-1), [[12, 20], [12, 20]])
  np.testing.assert_allclose(np.asarray(stats["score_sum"]).sum(-1), [[6, 10], [6, 10]], rtol=1e-5)


def test_scan_unrolled_and_moe_impls_agree():
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 512, (2, 16)))
  base = np.asarray(init_model(TINY.replace(scan_layers=True), seed=2)(ids))
  for kw in (dict(scan_layers=False), dict(), dict(moe_impl="dense"), dict(moe_impl="tiled")):
    other = np.asarray(init_model(TINY.replace(**kw), seed=2)(ids))
    np.testing.assert_allclose(other, base, rtol=1e-5, atol=1e-5)


def _jaxpr_size(cfg):
  model = init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  ids = jnp.zeros((1, 8), jnp.int32)
  return len(str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)).splitlines())


def test_traced_program_does_not_grow_with_depth():
  """With the layer scan; the default on a CPU target unrolls the layers."""
  shallow = _jaxpr_size(TINY.replace(num_hidden_layers=3, scan_layers=True))
  deep = _jaxpr_size(TINY.replace(num_hidden_layers=24, scan_layers=True))
  assert deep == shallow
  assert _jaxpr_size(TINY.replace(num_hidden_layers=6)) > _jaxpr_size(TINY)


_REMAT_IDS = jnp.asarray(np.random.default_rng(6).integers(0, 512, (2, 12)))


@functools.lru_cache(maxsize=None)
def _grads(policy):
  model = init_model(TINY.replace(remat_policy=policy, num_hidden_layers=2), seed=3)
  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, s)(_REMAT_IDS))[..., 0])
  return [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(state))]


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "save_attention_out"])
def test_remat_policies_keep_gradients(policy):
  for a, b in zip(_grads("none"), _grads(policy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_close_to_fp32():
  ids = jnp.asarray(np.random.default_rng(7).integers(0, 512, (2, 16)))
  ref = np.asarray(init_model(TINY, seed=4)(ids))
  low = init_model(TINY.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=4)
  assert low.stacks[1].layers.mlp.gate[...].dtype == jnp.float32  # router stays fp32
  got = np.asarray(low(ids))
  assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_custom_attention_impl_is_used():
  calls = []

  def spy(*a, **kw):
    calls.append(kw["scale"])
    return xla_attention(*a, **kw)

  register_attention_impl("spy_for_test", spy)
  init_model(TINY.replace(attention_impl="spy_for_test"))(jnp.zeros((1, 4), jnp.int32))
  assert calls and abs(calls[0] - TINY.qk_head_dim ** -0.5) < 1e-12


def test_bad_inputs_raise_clear_errors():
  model = init_model(TINY)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must have the shape"):
    model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="positions must have the shape"):
    model(jnp.zeros((1, 4), jnp.int32), positions_BT=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="attention_impl: unknown implementation 'nope'"):
    init_model(TINY.replace(attention_impl="nope"))(jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="moe_impl: unknown implementation 'nope'"):
    init_model(TINY.replace(moe_impl="nope"))(jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ConfigError, match="remat_policy"):
    TINY.replace(remat_policy="sometimes")


def test_interleaved_moe_layers_run_as_separate_stacks():
  cfg = TINY.replace(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
  model = init_model(cfg, seed=0)
  assert model.runs == (("dense", 2), ("moe", 1), ("dense", 1), ("moe", 1))
  logits, aux = model(jnp.zeros((1, 6), jnp.int32), return_aux=True)
  assert logits.shape == (1, 6, 512) and len(aux["router"]) == 2
  assert np.isfinite(np.asarray(logits)).all()


def test_tiled_experts_gradients_match_dense():
  rng = np.random.default_rng(8)
  n, d, f, e, k = 20, 8, 6, 5, 2
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  experts = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)

  def loss(impl, x, *ws):
    return jnp.sum(jnp.sin(impl(x, experts, weights, *ws, dtype=jnp.float32)))

  g_dense = jax.grad(functools.partial(loss, dense_experts), argnums=(0, 1, 2, 3))(x, *ws)
  # tile 1: groups of ~8 copies run as chunks of 4 then 1; tile 3: chunks of 3 that run past a
  # group's end into the next group's rows; tile 4: whole groups in one chunk of 16 or less.
  assert np.bincount(np.asarray(experts).ravel()).max() in range(5, 17)
  # Slots: 16 per expert hold every group, 4 do not (the dense product's gradients then).
  paths = [functools.partial(tiled_experts, tile=tile) for tile in (1, 3, 4)]
  paths += [functools.partial(slotted_experts, capacity=c) for c in (16, 4)]
  for impl in paths:
    g_tiled = jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3))(x, *ws)
    for a, b in zip(g_tiled, g_dense):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # An expert no copy goes to (4 here) gets a zero gradient, as in the dense product.
  experts = jnp.where(experts == 4, 0, experts)
  experts = experts.at[:, 1].set(jnp.where(experts[:, 0] == experts[:, 1], 1, experts[:, 1]))
  g_dense = jax.grad(functools.partial(loss, dense_experts), argnums=(0, 1, 2, 3))(x, *ws)
  g_tiled = jax.grad(functools.partial(loss, functools.partial(tiled_experts, tile=2)),
                     argnums=(0, 1, 2, 3))(x, *ws)
  assert not np.asarray(g_tiled[1][4]).any()
  for a, b in zip(g_tiled, g_dense):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, contract", [
    ((2, 5, 6), (6, 7), 1),            # [B, T, D] . [D, F]
    ((2, 5, 3, 4), (3, 4, 6), 2),      # o_proj: [B, T, H, V] . [H, V, D]
    ((2, 5, 6), (6, 3, 4), 1),         # q_proj: [B, T, D] . [D, H, K]
    ((5, 6), (6, 7), 1),               # one token dim: nothing to flatten
])
def test_token_dot_equals_the_contraction(x_shape, w_shape, contract):
  """token_dot (the projections' product, token dims flattened on an unsplit sequence) against
  float64 numpy, and with float32 accumulation asked for."""
  from coder_jax.model.layers import token_dot
  rng = np.random.default_rng(3)
  x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
  want = np.tensordot(x, w, contract)
  got = token_dot(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), contract)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  half = token_dot(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), contract,
                   preferred_element_type=jnp.float32)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(half), want, rtol=0.05, atol=0.1)
