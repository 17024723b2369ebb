"""Optimizer, schedules, train step (accumulation, non-finite guard), state shardings, mesh fit.

References are written independently of the library: python/numpy closed forms for the schedules,
a float64 numpy AdamW (clip + bias-corrected Adam + decoupled, masked weight decay), and hand
computed shard sizes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.model.config import get_config
from coder_jax.parallel.mesh import MeshConfig, MeshError, abstract_mesh, check_fit, make_mesh
from coder_jax.parallel.rules import logical_to_spec
from coder_jax.train import state as train_state
from coder_jax.train.data import SyntheticData
from coder_jax.train.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from coder_jax.train.step import make_train_step

TINY = get_config("tiny", dtype="float32", param_dtype="float32", moe_impl="tiled")
BATCH, SEQ = 8, 32


# ----------------------------------------------------------------------------------------------
# 1. Schedules
# ----------------------------------------------------------------------------------------------

def _ref_lr(kind, peak, warm, total, s, final=0.1, bounds=(0.6, 0.9), factor=0.316):
  w = min(warm, total)
  if s < w:
    return peak * (s + 1) / w
  if kind == "constant":
    return peak
  if kind == "cosine":
    frac = min(max((s - w) / max(total - w, 1), 0.0), 1.0)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac)))
  n = sum(s >= round(b * total) for b in bounds)
  return peak * factor ** n


@pytest.mark.parametrize("kind", ["cosine", "step", "constant"])
@pytest.mark.parametrize("peak,warm,total", [(4.2e-4, 20, 100), (1e-3, 0, 50), (3e-4, 7, 33),
                                             (1.0, 1, 10)])
def test_schedule_matches_closed_form(kind, peak, warm, total):
  cfg = OptimizerConfig(learning_rate=peak, schedule=kind, warmup_steps=warm)
  sched = make_schedule(cfg, total)
  steps = np.arange(total + 5)
  got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps)))   # traced steps
  ref = np.array([_ref_lr(kind, peak, warm, total, int(s)) for s in steps])
  np.testing.assert_allclose(got, ref, rtol=2e-6)
  # python-int steps give the same values (the trainer logs schedule(state["step"]))
  for s in (0, warm, total - 1, total):
    np.testing.assert_allclose(float(sched(s)), ref[s], rtol=2e-6)


def test_schedule_landmarks():
  peak, warm, total = 2e-3, 10, 110
  cos = make_schedule(OptimizerConfig(learning_rate=peak, warmup_steps=warm), total)
  assert float(cos(0)) == pytest.approx(peak / warm, rel=1e-6)
  assert float(cos(warm - 1)) == pytest.approx(peak, rel=1e-6)       # warm-up ends at the peak
  assert float(cos(warm)) == pytest.approx(peak, rel=1e-6)           # cosine starts at the peak
  assert float(cos(warm + 50)) == pytest.approx(peak * 0.55, rel=1e-5)  # half way: (1+0.1)/2
  assert float(cos(total)) == pytest.approx(0.1 * peak, rel=1e-6)    # 10% at the end
  assert float(cos(total + 1000)) == pytest.approx(0.1 * peak, rel=1e-6)
  step = make_schedule(OptimizerConfig(learning_rate=peak, schedule="step", warmup_steps=warm),
                       total)
  b1, b2 = round(0.6 * total), round(0.9 * total)                    # 66, 99
  assert float(step(b1 - 1)) == pytest.approx(peak, rel=1e-6)
  assert float(step(b1)) == pytest.approx(peak * 0.316, rel=1e-6)
  assert float(step(b2 - 1)) == pytest.approx(peak * 0.316, rel=1e-6)
  assert float(step(b2)) == pytest.approx(peak * 0.316 ** 2, rel=1e-6)
  const = make_schedule(OptimizerConfig(learning_rate=peak, schedule="constant",
                                        warmup_steps=0), total)
  assert all(float(const(s)) == pytest.approx(peak, rel=1e-7) for s in (0, 5, total, 10 * total))


@pytest.mark.parametrize("kwargs,field", [
    (dict(schedule="linear"), "optimizer_config.schedule"),
    (dict(schedule="Cosine"), "optimizer_config.schedule"),
    (dict(schedule="step", step_boundaries=(0.6, 1.2)), "optimizer_config.step_boundaries"),
    (dict(schedule="step", step_boundaries=(0.0, 0.9)), "optimizer_config.step_boundaries"),
    (dict(step_boundaries=(-0.1,)), "optimizer_config.step_boundaries"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(warmup_steps=-1), "warmup_steps"),
])
def test_invalid_optimizer_config(kwargs, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    OptimizerConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# 2. AdamW against float64 numpy
# ----------------------------------------------------------------------------------------------

def _small_tree(rng):
  return {"dense": {"kernel": rng.normal(size=(3, 4))},
          "experts": rng.normal(size=(2, 3, 4)),
          "input_layernorm": {"weight": 1.0 + 0.1 * rng.normal(size=(4,))},
          "stack": {"kv_a_layernorm": {"weight": 1.0 + 0.1 * rng.normal(size=(2, 5))}},
          "norm": {"weight": 1.0 + 0.1 * rng.normal(size=(4,))}}


_DECAYED = {"dense": {"kernel": True}, "experts": True, "input_layernorm": {"weight": False},
            "stack": {"kv_a_layernorm": {"weight": False}}, "norm": {"weight": False}}


def test_decay_mask():
  tree = _small_tree(np.random.default_rng(0))
  assert decay_mask(tree) == _DECAYED
  # on the real model: only norm scales escape decay
  _, abstract = train_state.abstract_model(TINY)
  mask = decay_mask(train_state.abstract_params(abstract))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  off = sorted(k for k, m in flat.items() if not m)
  assert off and all("layernorm" in k or "['norm']" in k for k in off), off
  assert flat["['embed_tokens']"] and flat["['lm_head']"]
  assert flat["['stacks'][1]['layers']['mlp']['experts_up_proj']"]
  assert flat["['stacks'][1]['layers']['mlp']['gate']"]
  assert not flat["['norm']['weight']"]


class _NumpyAdamW:
  """float64 clip-by-global-norm + bias-corrected Adam + decoupled, masked weight decay."""

  def __init__(self, lr_fn, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0):
    self.lr_fn, self.b1, self.b2, self.eps, self.wd, self.clip = lr_fn, b1, b2, eps, wd, clip
    self.t = 0
    self.mu = self.nu = None

  def step(self, params: list, grads: list, decay: list):
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    if norm > self.clip:
      grads = [g * (self.clip / norm) for g in grads]
    if self.mu is None:
      self.mu = [np.zeros_like(g) for g in grads]
      self.nu = [np.zeros_like(g) for g in grads]
    lr = self.lr_fn(self.t)
    self.t += 1
    out = []
    for i, (p, g, d) in enumerate(zip(params, grads, decay)):
      self.mu[i] = self.b1 * self.mu[i] + (1 - self.b1) * g
      self.nu[i] = self.b2 * self.nu[i] + (1 - self.b2) * g * g
      mhat = self.mu[i] / (1 - self.b1 ** self.t)
      vhat = self.nu[i] / (1 - self.b2 ** self.t)
      upd = mhat / (np.sqrt(vhat) + self.eps) + (self.wd * p if d else 0.0)
      out.append(p - lr * upd)
    return out, norm


@pytest.mark.parametrize("schedule,warm", [("constant", 0), ("cosine", 3)])
def test_adamw_matches_numpy(schedule, warm):
  rng = np.random.default_rng(1)
  peak, total = 0.05, 20
  cfg = OptimizerConfig(learning_rate=peak, schedule=schedule, warmup_steps=warm)
  assert (cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm) == (0.9, 0.95, 0.1, 1.0)
  opt, _ = make_optimizer(cfg, total)
  params64 = _small_tree(rng)
  treedef = jax.tree.structure(params64)
  decay = jax.tree.leaves(_DECAYED)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params64)
  state = opt.init(params)
  ref = _NumpyAdamW(lambda t: _ref_lr(schedule, peak, warm, total, t))
  ref_p = [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]
  update = jax.jit(opt.update)
  norms = []
  # big gradient (clipped), small gradient (not clipped), big again, then a zero gradient
  for scale in (3.0, 0.05, 10.0, 0.0):
    g64 = [scale * rng.normal(size=p.shape) / math.sqrt(20.0) for p in ref_p]
    grads = jax.tree.unflatten(treedef, [jnp.asarray(g, jnp.float32) for g in g64])
    upd, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)
    ref_p, norm = ref.step(ref_p, [np.asarray(g, np.float32).astype(np.float64) for g in g64],
                           decay)
    norms.append(norm)
    for got, want in zip(jax.tree.leaves(params), ref_p):
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6, atol=2e-7)
  assert norms[0] > 1.0 and norms[2] > 1.0 and norms[1] < 1.0     # clipping acted and did not


def test_weight_decay_is_decoupled_and_masked():
  """A zero gradient on a fresh state: Adam's term is 0, so the update is -lr * wd * p exactly
  on decayed leaves and 0 on norm scales."""
  lr = 0.3
  opt, _ = make_optimizer(OptimizerConfig(learning_rate=lr, schedule="constant",
                                          warmup_steps=0), 10)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), _small_tree(np.random.default_rng(2)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  for u, p, d in zip(jax.tree.leaves(upd), jax.tree.leaves(params), jax.tree.leaves(_DECAYED)):
    want = -lr * 0.1 * np.asarray(p, np.float64) if d else np.zeros(p.shape)
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# 3./4. Train step: gradient accumulation, padding rows, non-finite guard
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def step_env():
  """State on an fsdp=2 mesh (batch shards = 2: the micro-batch 2 of grad_accum_steps=4 divides)
  and jitted steps for grad_accum_steps 1 and 4.

  Adam's eps is 1e-6 here (not 1e-8): the first Adam step is g / (|g| + eps), so with a tiny eps
  a gradient element that cancels to ~1e-9 flips its whole lr-sized update on a last-ulp change
  of the summation order, which says nothing about accumulation. The AdamW defaults are checked
  against numpy above; here the moments (linear in the gradient) are compared as well.
  Every batch carries `nan_poison` (0.0 unless testing the guard) so one compiled step serves
  both the accumulation and the guard tests."""
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=1, tensor=1), devices=jax.devices()[:2])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 1, "expert": 1, "tensor": 1}
  check_fit(mesh, TINY, batch_size=BATCH, grad_accum_steps=4)
  opt_cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, eps=1e-6)
  optimizer, schedule = make_optimizer(opt_cfg, 10)
  with jax.set_mesh(mesh):
    graphdef, state, shardings = train_state.init_state(TINY, optimizer, mesh, seed=0)
  out_sh = (shardings, NamedSharding(mesh, P()))
  steps = {a: jax.jit(make_train_step(graphdef, TINY, optimizer, schedule, grad_accum_steps=a),
                      in_shardings=(shardings, None), out_shardings=out_sh)
           for a in (1, 4)}
  batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "activation_length"),
                                                      (BATCH, SEQ), mesh))
  assert batch_sharding.spec[0] is not None          # the batch really is split over fsdp
  return dict(mesh=mesh, state=state, steps=steps, batch_sharding=batch_sharding)


def _np_batch(start_batch=0):
  stream = SyntheticData().open(model_vocab=TINY.vocab_size, batch_rows=BATCH, seq_len=SEQ,
                                shard=0, num_shards=1, start_batch=start_batch)
  return next(stream)


def _pad_rows(batch, rows):
  out = {k: v.copy() for k, v in batch.items()}
  for k in out:
    out[k][list(rows)] = 0
  return out


def _run(env, accum, np_batch, nan_poison=0.0):
  with jax.set_mesh(env["mesh"]):
    batch = {k: jax.device_put(v, env["batch_sharding"]) for k, v in np_batch.items()}
    batch["nan_poison"] = jax.device_put(np.float32(nan_poison), NamedSharding(env["mesh"], P()))
    new_state, metrics = env["steps"][accum](env["state"], batch)
  return jax.device_get(new_state), jax.device_get(metrics)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("pad", [(), (5,), (1, 5)], ids=["full", "one_pad_row",
                                                        "pad_micro_batch"])
def test_grad_accumulation_matches_single_step(step_env, pad):
  """(1, 5): rows 1 and 5 are micro-batch 1 of 4 (row r -> micro-batch r % 4): all padding."""
  batch = _pad_rows(_np_batch(), pad)
  for r in pad:
    assert not batch["segment_ids"][r].any() and not batch["loss_weights"][r].any()
  s1, m1 = _run(step_env, 1, batch)
  s4, m4 = _run(step_env, 4, batch)
  for m in (m1, m4):
    assert int(m["skipped"]) == 0, m
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert float(m["tokens"]) == float(batch["loss_weights"].sum())
  assert _rel(m4["loss"], m1["loss"]) <= 1e-5
  assert _rel(m4["ce_loss"], m1["ce_loss"]) <= 1e-5
  assert _rel(m4["expert_balance"], m1["expert_balance"]) <= 1e-5
  assert _rel(m4["grad_norm"], m1["grad_norm"]) <= 1e-5
  np.testing.assert_allclose(m4["expert_load"], m1["expert_load"], rtol=1e-5, atol=1e-7)
  old = jax.device_get(step_env["state"]["params"])
  flat1 = jax.tree_util.tree_flatten_with_path(s1["params"])[0]
  for (path, p1), p4, p0 in zip(flat1, jax.tree.leaves(s4["params"]), jax.tree.leaves(old)):
    name = jax.tree_util.keystr(path)
    assert _rel(p4, p1) <= 1e-5, name
    assert not np.array_equal(p1, p0), name  # an update happened on every leaf
  # mu = (1 - b1) * clipped grad and nu = (1 - b2) * grad^2 after one step: the accumulated
  # gradients themselves, leaf by leaf
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s4["opt_state"])[0],
                          jax.tree.leaves(s1["opt_state"])):
    assert _rel(a, b) <= 1e-5, jax.tree_util.keystr(path)
  assert int(s1["step"]) == int(s4["step"]) == 1
  assert int(s1["nonfinite"]) == int(s4["nonfinite"]) == 0


def test_nonfinite_guard_skips_update(step_env):
  batch = _np_batch()
  state0 = jax.device_get(step_env["state"])
  s_nan, m_nan = _run(step_env, 1, batch, nan_poison=np.nan)
  assert int(m_nan["skipped"]) == 1
  assert not np.isfinite(m_nan["loss"])
  for a, b in zip(jax.tree.leaves(s_nan["params"]), jax.tree.leaves(state0["params"])):
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))
  for a, b in zip(jax.tree.leaves(s_nan["opt_state"]), jax.tree.leaves(state0["opt_state"])):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert int(s_nan["nonfinite"]) == int(state0["nonfinite"]) + 1
  assert int(s_nan["step"]) == int(state0["step"]) + 1
  np.testing.assert_array_equal(s_nan["rng"], state0["rng"])

  s_ok, m_ok = _run(step_env, 1, batch, nan_poison=0.0)
  assert int(m_ok["skipped"]) == 0 and np.isfinite(m_ok["loss"])
  assert int(s_ok["nonfinite"]) == int(state0["nonfinite"])
  assert int(s_ok["step"]) == int(state0["step"]) + 1
  # the metrics of the skipped step still describe the batch (finite grad norm, same tokens)
  assert m_nan["grad_norm"] == m_ok["grad_norm"] and m_nan["tokens"] == m_ok["tokens"]
  # the poison also skips inside an accumulated step
  s_acc, m_acc = _run(step_env, 4, batch, nan_poison=np.inf)
  assert int(m_acc["skipped"]) == 1 and int(s_acc["nonfinite"]) == 1
  for a, b in zip(jax.tree.leaves(s_acc["params"]), jax.tree.leaves(state0["params"])):
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s_ok["params"]),
                                                      jax.tree.leaves(state0["params"]))]
  assert all(changed)
  counts = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(s_ok["opt_state"])[0]
            if jax.tree_util.keystr(p).endswith(".count")]
  assert counts and all(int(c) == 1 for c in counts)


# ----------------------------------------------------------------------------------------------
# 5. Optimizer-state shardings and per-device bytes
# ----------------------------------------------------------------------------------------------

def _moment_and_count_paths(specs):
  """[(kind, suffix keys, spec)] for mu/nu and count leaves of the optimizer-state spec tree."""
  out = []
  for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]:
    names = [getattr(k, "name", None) for k in path]
    for kind in ("mu", "nu", "count"):
      if kind in names:
        i = names.index(kind)
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path[i + 1:])
        out.append((kind, keys, spec))
  return out


def _axes(entry):
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


@pytest.fixture(scope="module")
def ep_specs():
  mesh = make_mesh(MeshConfig(data=1, fsdp=4, expert=2, tensor=1))
  optimizer, _ = make_optimizer(OptimizerConfig(), 100)
  graphdef, abstract, specs = train_state.state_specs(TINY, optimizer, mesh)
  return mesh, abstract, specs


def test_opt_state_specs_mirror_params(ep_specs):
  mesh, abstract, specs = ep_specs
  entries = _moment_and_count_paths(specs["opt_state"])
  n_params = len(jax.tree.leaves(abstract["params"]))
  assert sum(k == "mu" for k, _, _ in entries) == n_params
  assert sum(k == "nu" for k, _, _ in entries) == n_params
  assert sum(k == "count" for k, _, _ in entries) >= 1
  for kind, keys, spec in entries:
    if kind == "count":
      assert spec == P(), (kind, keys, spec)
    else:
      assert spec == _get(specs["params"], keys), (kind, keys, spec)
  # every optimizer leaf has a spec, and no leaf beyond mu/nu/count exists
  assert len(jax.tree.leaves(abstract["opt_state"])) == len(entries)
  # expert weights over 'expert' (and fsdp on the embed dim); embed table over 'fsdp'
  mlp = specs["params"]["stacks"][1]["layers"]["mlp"]
  assert mlp["experts_up_proj"] == P(None, "expert", "fsdp", "tensor")
  assert mlp["experts_down_proj"] == P(None, "expert", "tensor", "fsdp")
  emb = specs["params"]["embed_tokens"]                  # (vocab, embed)
  assert emb[0] == "tensor" and "fsdp" in _axes(emb[1]), emb
  mu = specs["opt_state"][1][0].mu
  assert mu["stacks"][1]["layers"]["mlp"]["experts_gate_proj"][1] == "expert"
  assert mu["embed_tokens"] == emb
  assert specs["opt_state"][1][0].count == P()
  assert specs["step"] == specs["rng"] == specs["nonfinite"] == P()
  # shardings build on the mesh and divide every dimension they name
  shardings = train_state.to_shardings(specs, mesh)
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    sh.shard_shape(leaf.shape)


def test_opt_state_specs_small_tree():
  """Parameters sharing a trailing key and a shape but not a spec (which matching by path
  suffix and shape could mix up) each get their own spec."""
  params = {"a": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
            "b": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
            "c": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
            "w": jax.ShapeDtypeStruct((8, 8), jnp.float32),
            "norm": {"weight": jax.ShapeDtypeStruct((8,), jnp.float32)}}
  specs = {"a": {"w": P("fsdp", None)}, "b": {"w": P(None, "tensor")},
           "c": {"w": P("fsdp", "tensor")}, "w": P(None, "fsdp"), "norm": {"weight": P()}}
  optimizer, _ = make_optimizer(OptimizerConfig(), 10)
  opt_abstract = jax.eval_shape(optimizer.init, params)
  got = train_state.opt_state_specs(optimizer, opt_abstract, specs)
  entries = _moment_and_count_paths(got)
  assert len(entries) == 2 * 5 + 2
  for kind, keys, spec in entries:
    assert spec == (P() if kind == "count" else _get(specs, keys)), (kind, keys, spec)


def test_bytes_per_device(ep_specs):
  mesh, abstract, specs = ep_specs
  shape = dict(mesh.shape)
  assert shape == {"data": 1, "fsdp": 4, "context": 1, "expert": 2, "tensor": 1}
  bpd = train_state.bytes_per_device
  up = abstract["params"]["stacks"][1]["layers"]["mlp"]["experts_up_proj"]   # (2, 8, 64, 32)
  up_spec = specs["params"]["stacks"][1]["layers"]["mlp"]["experts_up_proj"]
  assert up.shape == (2, 8, 64, 32)
  assert bpd({"x": up}, {"x": up_spec}, shape) == 2 * (8 // 2) * (64 // 4) * 32 * 4
  emb = abstract["params"]["embed_tokens"]                                   # (512, 64)
  assert bpd({"x": emb}, {"x": P("tensor", "fsdp")}, shape) == 512 * (64 // 4) * 4
  assert bpd({"x": emb}, {"x": P("tensor", ("fsdp", "expert"))}, shape) == 512 * (64 // 8) * 4
  emb_div = math.prod(shape[a] for a in _axes(specs["params"]["embed_tokens"][1]))
  assert emb_div in (4, 8)                      # fsdp, or fsdp x expert
  assert bpd({"x": emb}, {"x": specs["params"]["embed_tokens"]}, shape) == 512 * 64 // emb_div * 4
  norm = abstract["params"]["norm"]["weight"]
  assert bpd([norm], [specs["params"]["norm"]["weight"]], shape) == 64 * 4
  # a tuple of mesh axes divides by their product; an uneven split counts the larger shard
  odd = jax.ShapeDtypeStruct((16, 5), jnp.float32)
  assert bpd([odd], [P(("fsdp", "expert"), None)], shape) == 2 * 5 * 4
  assert bpd([odd], [P(None, "fsdp")], shape) == 16 * 2 * 4
  assert bpd([jax.ShapeDtypeStruct((6,), jnp.bfloat16)], [P("expert")], shape) == 3 * 2

  # the whole train state against an independent per-leaf computation (params + mu + nu)
  def shard_bytes(leaf, spec):
    dims = list(leaf.shape)
    for i, ax in enumerate(spec):
      if ax is None:
        continue
      for a in (ax if isinstance(ax, tuple) else (ax,)):
        dims[i] = -(-dims[i] // shape[a])
    return int(np.prod(dims, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  p_leaves = jax.tree.leaves(abstract["params"])
  s_leaves = jax.tree.leaves(specs["params"], is_leaf=lambda x: isinstance(x, P))
  per_param = sum(shard_bytes(l, s) for l, s in zip(p_leaves, s_leaves))
  n_counts = sum(k == "count" for k, _, _ in _moment_and_count_paths(specs["opt_state"]))
  want = 3 * per_param + 4 * n_counts + 4 + 8 + 4      # counts, step, rng (2 x uint32), nonfinite
  assert bpd(abstract, specs, shape) == want
  assert bpd(abstract["params"], specs["params"], shape) == per_param
  total = sum(int(np.prod(l.shape)) * 4 for l in p_leaves)
  assert per_param < total                                # sharding actually saves memory


# ----------------------------------------------------------------------------------------------
# 6. Mesh fit and MeshConfig.sizes
# ----------------------------------------------------------------------------------------------

def _fit_error(mesh, **kw):
  with pytest.raises(MeshError) as e:
    check_fit(mesh, TINY, **kw)
  return str(e.value)


def test_check_fit_experts_not_divisible():
  assert TINY.n_routed_experts == 8
  mesh = abstract_mesh(MeshConfig(data=1, fsdp=1, expert=16, tensor=1), 16)
  msg = _fit_error(mesh)
  assert "n_routed_experts=8" in msg and "expert axis (16)" in msg, msg
  assert "expert=16" in msg, msg
  check_fit(abstract_mesh(MeshConfig(fsdp=-1, expert=8), 16), TINY)    # 8 | 8: fine


def test_check_fit_heads_not_divisible():
  assert TINY.num_attention_heads == 4
  msg = _fit_error(make_mesh(MeshConfig(data=1, fsdp=1, expert=1, tensor=8)))
  assert "num_attention_heads=4" in msg and "tensor axis (8)" in msg, msg
  msg = _fit_error(abstract_mesh(MeshConfig(fsdp=2, tensor=8), 16))
  assert "num_attention_heads=4" in msg and "tensor axis (8)" in msg, msg
  check_fit(make_mesh(MeshConfig(fsdp=2, tensor=4)), TINY)


def test_check_fit_batch():
  mesh = abstract_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), 8)
  msg = _fit_error(mesh, batch_size=12)
  assert "batch_size=12" in msg and "2 x 2 x 2 = 8" in msg, msg
  msg = _fit_error(mesh, batch_size=16, grad_accum_steps=4)   # micro-batch 4 over 8 shards
  assert "batch_size=16" in msg and "micro-batch 4" in msg and "= 8" in msg, msg
  msg = _fit_error(mesh, batch_size=16, grad_accum_steps=3)
  assert "batch_size=16 is not divisible by grad_accum_steps=3" in msg, msg
  msg = _fit_error(mesh, batch_size=16, grad_accum_steps=0)
  assert "grad_accum_steps=0" in msg, msg
  check_fit(mesh, TINY, batch_size=16, grad_accum_steps=2)
  check_fit(mesh, TINY, batch_size=8)
  # several problems are reported together
  mesh = abstract_mesh(MeshConfig(data=1, fsdp=1, expert=16, tensor=8), 128)
  msg = _fit_error(mesh, batch_size=8)
  assert "n_routed_experts=8" in msg and "num_attention_heads=4" in msg and "batch_size=8" in msg


@pytest.mark.parametrize("cfg,needles", [
    (MeshConfig(data=-1, fsdp=-1), ["at most one axis may be -1", "data, fsdp"]),
    (MeshConfig(data=2, fsdp=2, expert=1, tensor=1), ["multiply to 4", "8 devices"]),
    (MeshConfig(data=4, fsdp=4, expert=1, tensor=1), ["multiply to 16", "8 devices"]),
    (MeshConfig(data=3, fsdp=-1), ["8 devices are not divisible", "product 3"]),
    (MeshConfig(data=0), ["positive", "data=0"]),
    (MeshConfig(tensor=-2), ["positive", "tensor=-2"]),
    (MeshConfig(expert=0, tensor=-3), ["expert=0", "tensor=-3"]),
])
def test_mesh_config_sizes_errors(cfg, needles):
  with pytest.raises(MeshError) as e:
    cfg.sizes(8)
  assert isinstance(e.value, ValueError)
  for n in needles:
    assert n in str(e.value), (n, str(e.value))
  with pytest.raises(MeshError):
    make_mesh(cfg)


def test_mesh_config_sizes_ok():
  assert MeshConfig().sizes(8) == {"data": 1, "fsdp": 8, "context": 1, "expert": 1, "tensor": 1}
  assert MeshConfig(data=2, expert=2).sizes(8) == {"data": 2, "fsdp": 2, "context": 1,
                                                   "expert": 2, "tensor": 1}
  assert MeshConfig(context=4).sizes(8)["fsdp"] == 2
  assert MeshConfig(data=-1, fsdp=2, tensor=2).sizes(8)["data"] == 2
  assert MeshConfig(data=2, fsdp=1, expert=2, tensor=2).sizes(8)["fsdp"] == 1
  assert dict(abstract_mesh(MeshConfig(expert=16), 64).shape) == {
      "data": 1, "fsdp": 4, "context": 1, "expert": 16, "tensor": 1}
