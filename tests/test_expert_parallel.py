"""Expert parallelism (coder_jax/parallel/expert.py) and device-limited routing, on 8 fake CPUs.

Dropless sharded MoE == unsharded MoE (outputs and gradients, op level and model level); the
pair capacity rule against an independent numpy transcription (the per-device rule, guarded
rows and bounded buffers: test_expert_dispatch.py); device-limited routing against float64
numpy; the config / batch-split errors.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from random_params import random_model_state
from coder_jax.model import ConfigError, get_config, get_moe_impl, route
from coder_jax.parallel.expert import capacity, experts_forward, token_dropping
from coder_jax.parallel.mesh import MeshConfig, make_mesh

E, K, DIM, FF = 8, 2, 16, 16          # experts, experts per token, model dim, expert hidden dim

# (data, fsdp, expert, tensor); every product is 8 (the fake device count).
DROPLESS_MESHES = [(1, 2, 4, 1), (1, 1, 8, 1), (2, 1, 2, 2), (1, 1, 2, 4)]


def _mesh(data=1, fsdp=1, expert=1, tensor=1):
  return make_mesh(MeshConfig(data=data, fsdp=fsdp, expert=expert, tensor=tensor))


def _cfg(**kw):
  base = dict(n_routed_experts=E, num_experts_per_tok=K, hidden_size=DIM,
              moe_intermediate_size=FF)
  return get_config("tiny", **{**base, **kw})


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _problem(seed, n, *, bias=None, cfg=None):
  """Random tokens, expert weights and a routing from `route` on random logits.

  bias: added to the logits (skews the routing)."""
  rng = np.random.default_rng(seed)
  cfg = cfg or _cfg()
  x = rng.normal(size=(n, DIM)).astype(np.float32)
  wg = (rng.normal(size=(E, DIM, FF)) * 0.3).astype(np.float32)
  wu = (rng.normal(size=(E, DIM, FF)) * 0.3).astype(np.float32)
  wd = (rng.normal(size=(E, FF, DIM)) * 0.3).astype(np.float32)
  logits = rng.normal(size=(n, E)) * 2.0
  if bias is not None:
    logits = logits + np.asarray(bias)
  r = route(jnp.asarray(logits, jnp.float32), cfg)
  scores = np.asarray(r.scores_NE)
  experts = np.asarray(r.experts_NK)
  weights = np.asarray(r.weights_NK)
  affinity = np.take_along_axis(scores, experts, axis=1)
  return dict(x=x, experts=experts, weights=weights, affinity=affinity, wg=wg, wu=wu, wd=wd)


def _args(p):
  return [jnp.asarray(p[k]) for k in ("x", "experts", "weights", "affinity", "wg", "wu", "wd")]


def _run(cfg, p, *, mesh=None, drop=False, impl="ragged", kept=False):
  """experts_forward under jax.jit, traced inside the mesh / token_dropping contexts."""
  fn = jax.jit(lambda *a: experts_forward(cfg, *a, impl=get_moe_impl(impl), dtype=jnp.float32,
                                          return_kept=kept))
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    if drop:
      stack.enter_context(token_dropping())
    out = fn(*_args(p))
  return jax.tree.map(np.asarray, out)


def _fwd_and_grads(cfg, p, proj, *, mesh=None, impl="ragged"):
  """Output, kept mask and the gradients of sum(out * proj) w.r.t. x, w_gate, w_up, w_down (one
  compilation)."""
  def loss(x, ex, w, a, g, u, dn):
    y, kept = experts_forward(cfg, x, ex, w, a, g, u, dn, impl=get_moe_impl(impl),
                              dtype=jnp.float32, return_kept=True)
    return jnp.sum(y * proj), (y, kept)
  fn = jax.jit(jax.grad(loss, argnums=(0, 4, 5, 6), has_aux=True))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    grads, (y, kept) = fn(*_args(p))
  return np.asarray(y), np.asarray(kept), [np.asarray(g) for g in grads]


def _np_expert(x, wg, wu, wd):
  """float64 SwiGLU expert on rows x."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  g, u = x @ wg, x @ wu
  return (g / (1.0 + np.exp(-g)) * u) @ wd


def _np_moe(p, kept):
  """float64 sum over the kept copies of weight * expert(x)."""
  n, k = p["experts"].shape
  out = np.zeros((n, DIM))
  for t in range(n):
    for j in range(k):
      if kept[t, j]:
        i = p["experts"][t, j]
        out[t] += float(p["weights"][t, j]) * _np_expert(p["x"][t:t + 1], p["wg"][i], p["wu"][i],
                                                         p["wd"][i])[0]
  return out


def _np_kept(experts, affinity, *, n_local, num_devices, capacity_factor):
  """The pair rule, written independently: each block of n_local consecutive tokens (one
  device's shard) sends, to each destination device, only its C highest-affinity copies (copies
  flattened token-major; ties: lower copy index first)."""
  n, k = experts.shape
  per_dev = E // num_devices
  c = math.ceil(capacity_factor * n_local * k / num_devices)
  kept = np.zeros(n * k, bool)
  for start in range(0, n, n_local):
    ids = np.arange(start * k, (start + n_local) * k)       # global copy indices of this shard
    ex = experts.reshape(-1)[ids]
    aff = affinity.reshape(-1)[ids]
    for dest in range(num_devices):
      mine = [(-float(aff[i]), int(i)) for i in range(len(ids)) if ex[i] // per_dev == dest]
      for _, i in sorted(mine)[:c]:
        kept[ids[i]] = True
  return kept.reshape(n, k)


# ------------------------------------------------------------------------------ dropless


@functools.lru_cache(maxsize=None)
def _dropless_case():
  """One problem for every mesh, with its unsharded output and gradients (computed once)."""
  p = _problem(10, 64)
  proj = jnp.asarray(np.random.default_rng(11).normal(size=(64, DIM)), jnp.float32)
  ref, _, g_ref = _fwd_and_grads(_cfg(), p, proj)
  return p, proj, ref, g_ref


@pytest.mark.parametrize("mesh_shape", DROPLESS_MESHES)
def test_dropless_matches_unsharded_outputs_and_grads(mesh_shape):
  p, proj, ref, g_ref = _dropless_case()
  assert _rel(ref, _np_moe(p, np.ones((64, K), bool))) <= 1e-5
  out, kept, g_ep = _fwd_and_grads(_cfg(), p, proj, mesh=_mesh(*mesh_shape))
  assert kept.all()
  assert _rel(out, ref) <= 1e-5, (mesh_shape, _rel(out, ref))
  for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), g_ep, g_ref):
    assert _rel(a, b) <= 1e-5, (mesh_shape, name, _rel(a, b))


@pytest.mark.parametrize("impl", ["tiled", "dense"])
def test_dropless_other_local_impls(impl):
  p = _problem(12, 32)
  out = _run(_cfg(moe_impl=impl), p, mesh=_mesh(fsdp=2, expert=4), impl=impl)
  assert _rel(out, _np_moe(p, np.ones((32, K), bool))) <= 1e-5



def test_model_logits_under_expert_meshes():
  cfg = get_config("tiny", num_hidden_layers=2)        # one dense layer, one MoE layer
  graphdef, state = random_model_state(cfg, 3)
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 8)), jnp.int32)
  seg = np.ones((8, 8), np.int32)
  seg[:, 5:] = 2
  seg[3, 6:] = 0                                       # some padding
  seg = jnp.asarray(seg)

  def fwd(s, i, sg):
    logits, aux = nnx.merge(graphdef, s)(i, sg, return_aux=True)
    return logits, aux["router"]

  ref_logits, ref_aux = jax.jit(fwd)(state, ids, seg)
  for shape in DROPLESS_MESHES:
    with jax.set_mesh(_mesh(*shape)):
      logits, aux = jax.jit(fwd)(state, ids, seg)
    assert _rel(logits, ref_logits) <= 1e-5, (shape, _rel(logits, ref_logits))
    for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(ref_aux)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ capacity

# (data, fsdp, expert, tensor) or None (no mesh: one device, P = 1)
CAPACITY_MESHES = [None, (2, 4, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 4, 2)]


def test_capacity_formula():
  assert capacity(40, 4, None, True) == 40
  assert capacity(40, 4, 1.0, False) == 40
  assert capacity(40, 4, 1.0, True) == 10
  assert capacity(40, 4, 0.5, True) == 5
  assert capacity(40, 4, 1.5, True) == 15
  assert capacity(10, 4, 0.3, True) == 1          # ceil(0.75)
  assert capacity(10, 1, 2.0, True) == 10         # never more than every copy


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("mesh_shape", CAPACITY_MESHES)
def test_capacity_keeps_highest_affinity_per_destination(mesh_shape, capacity_factor):
  n = 64
  cfg = _cfg(capacity_factor=capacity_factor, capacity_rule="pair")
  # Bias towards experts 0, 1 (device 0 whenever P > 1) so that budgets overflow.
  bias = np.array([2.5, 2.0, 0, 0, 0, 0, 0, 0])
  p = _problem(20 + int(capacity_factor * 10), n, bias=bias)
  if mesh_shape is None:
    mesh, num_devices, shards = None, 1, 1
  else:
    mesh, num_devices, shards = _mesh(*mesh_shape), mesh_shape[2], math.prod(mesh_shape[:3])
  out, kept = _run(cfg, p, mesh=mesh, drop=True, kept=True)
  ref_kept = _np_kept(p["experts"], p["affinity"], n_local=n // shards, num_devices=num_devices,
                      capacity_factor=capacity_factor)
  np.testing.assert_array_equal(kept, ref_kept)
  if num_devices == 1 and capacity_factor >= 1.0:
    assert kept.all()                   # one destination with room for every copy
  else:
    assert not kept.all(), "the skewed routing should overflow some budget"
  assert _rel(out, _np_moe(p, ref_kept)) <= 1e-5


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4, 1)])
def test_capacity_ties_break_by_lower_copy_index(mesh_shape):
  n = 64
  cfg = _cfg(capacity_factor=0.75, capacity_rule="pair")
  p = _problem(30, n, bias=np.array([1.5, 1.5, 0, 0, 0, 0, 0, 0]))
  # Affinities on a coarse grid: many exact ties, which only the copy index can break.
  p["affinity"] = np.random.default_rng(31).choice(
      np.array([0.25, 0.5, 0.75], np.float32), size=(n, K))
  mesh = None if mesh_shape is None else _mesh(*mesh_shape)
  num_devices = 1 if mesh_shape is None else mesh_shape[2]
  shards = 1 if mesh_shape is None else math.prod(mesh_shape[:3])
  out, kept = _run(cfg, p, mesh=mesh, drop=True, kept=True)
  ref_kept = _np_kept(p["experts"], p["affinity"], n_local=n // shards, num_devices=num_devices,
                      capacity_factor=0.75)
  assert not ref_kept.all()
  np.testing.assert_array_equal(kept, ref_kept)
  assert _rel(out, _np_moe(p, ref_kept)) <= 1e-5


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4, 1)])
def test_no_dropping_outside_token_dropping(mesh_shape):
  n = 64
  p = _problem(40, n, bias=np.array([3.0, 3.0, 0, 0, 0, 0, 0, 0]))
  cfg = _cfg(capacity_factor=0.5)
  mesh = None if mesh_shape is None else _mesh(*mesh_shape)
  out, kept = _run(cfg, p, mesh=mesh, kept=True)          # eval: no token_dropping()
  assert kept.all()
  assert _rel(out, _np_moe(p, kept)) <= 1e-5
  _, kept_train = _run(cfg, p, mesh=mesh, drop=True, kept=True)
  assert not kept_train.all()                               # the same config does drop in training


# ------------------------------------------------------------------------------ routing


def _np_device_limited(scores, k, groups, limit, scale, norm):
  """float64: keep the `limit` groups whose best expert scores highest, then top-k inside them."""
  n, e = scores.shape
  chosen = np.zeros((n, k), int)
  weights = np.zeros((n, k))
  for t in range(n):
    best = scores[t].reshape(groups, -1).max(axis=1)
    keep = np.argsort(-best, kind="stable")[:limit]
    allowed = np.isin(np.arange(e) // (e // groups), keep)
    s = np.where(allowed, scores[t], -np.inf)
    chosen[t] = np.argsort(-s, kind="stable")[:k]
    weights[t] = scores[t, chosen[t]]
  if k > 1 and norm:
    weights = weights / weights.sum(-1, keepdims=True)
  else:
    weights = weights * scale
  return chosen, weights


@pytest.mark.parametrize("groups,limit,k,scale,norm", [
    (4, 2, 4, 1.0, False), (4, 1, 3, 2.5, False), (8, 3, 6, 1.0, True), (2, 1, 2, 16.0, False)])
def test_device_limited_routing_matches_numpy(groups, limit, k, scale, norm):
  e = 16
  cfg = get_config("tiny", n_routed_experts=e, num_experts_per_tok=k, routing_devices=groups,
                   routing_device_limit=limit, routed_scaling_factor=scale, norm_topk_prob=norm)
  logits = np.random.default_rng(50 + groups * limit).normal(size=(128, e)) * 2.0
  r = route(jnp.asarray(logits, jnp.float32), cfg)
  scores = np.exp(logits - logits.max(-1, keepdims=True))
  scores /= scores.sum(-1, keepdims=True)
  chosen, weights = _np_device_limited(scores, k, groups, limit, scale, norm)
  got_e = np.asarray(r.experts_NK)
  per = e // groups
  assert max(len(set(row // per)) for row in got_e) <= limit
  # the limit binds for some token (otherwise this tests nothing beyond plain top-k)
  plain = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  assert max(len(set(row // per)) for row in plain) > limit
  o_got, o_ref = np.argsort(got_e, axis=1), np.argsort(chosen, axis=1)
  np.testing.assert_array_equal(np.take_along_axis(got_e, o_got, 1),
                                np.take_along_axis(chosen, o_ref, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights_NK), o_got, 1),
                             np.take_along_axis(weights, o_ref, 1), rtol=1e-5, atol=1e-7)


def test_device_limit_config_errors():
  with pytest.raises(ConfigError, match="routing_device_limit"):
    get_config("tiny", routing_devices=4, routing_device_limit=5)
  with pytest.raises(ConfigError, match="routing_device_limit"):
    get_config("tiny", routing_devices=4, routing_device_limit=0)
  with pytest.raises(ConfigError, match="routing_devices"):
    get_config("tiny", routing_devices=3)                     # 8 experts
  with pytest.raises(ConfigError, match="routing_devices"):
    get_config("tiny", routing_devices=3, routing_device_limit=1)
  # k = 2 experts cannot come from one device of one expert
  with pytest.raises(ConfigError, match="routing_device_limit"):
    get_config("tiny", routing_devices=8, routing_device_limit=1)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("n,mesh_shape", [(3, (2, 1, 4, 1)), (3, (1, 1, 8, 1)),
                                          (12, (2, 1, 4, 1)), (6, (1, 2, 2, 2))])
def test_batch_not_splittable_over_expert_axis(n, mesh_shape):
  p = _problem(60, n)
  with pytest.raises(ValueError, match=r"expert parallelism: .*cannot be split.*"
                                       r"divisible by data x fsdp x expert"):
    _run(_cfg(), p, mesh=_mesh(*mesh_shape))
