"""DeepSeek-V2's per-device capacity rule, the never-dropped rows, and dispatch in bounded
buffers with overflow rounds (coder_jax/parallel/expert.py, dispatch.py), on 8 fake CPUs.

Oracles: an independent numpy transcription of the per-receiving-device budget; float64 numpy
experts; the unsharded dropless MoE for outputs and gradients. The ragged_all_to_all transport
runs here through an emulation built from all_to_all (XLA:CPU has none), which checks its offsets
arithmetic; with libtpu it is also compiled for a v5p topology.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from random_params import random_model_state
from test_expert_parallel import (DIM, E, K, _args, _cfg, _mesh, _np_kept, _np_moe, _problem,
                                  _rel)
from coder_jax.model import ConfigError, get_config, get_moe_impl
from coder_jax.parallel import dispatch, expert
from coder_jax.parallel.expert import (device_budget, dispatch_window, experts_forward,
                                       guarded_rows, token_dropping)

SKEW = np.array([3.0, 2.5, 0, 0, 0, 0, 0, 0])      # experts 0, 1: device 0 for every P > 1
# (data, fsdp, expert, tensor) by expert-parallel size P
MESHES = {1: None, 2: (2, 2, 2, 1), 4: (1, 2, 4, 1), 8: (1, 1, 8, 1)}


def _np_device_kept(experts, affinity, *, n_local, num_devices, capacity_factor):
  """Per expert group (num_devices consecutive shards of n_local tokens): each receiving device
  keeps every guarded (+inf) copy, then the highest-affinity others (ties: lower global copy
  index) up to ceil(c x copies per device) in all."""
  n, k = experts.shape
  per_dev = E // num_devices
  budget = min(num_devices * n_local * k, math.ceil(capacity_factor * n_local * k))
  ex, aff = experts.reshape(-1), affinity.reshape(-1).astype(np.float64)
  kept = np.zeros(n * k, bool)
  group = n_local * num_devices * k
  for g0 in range(0, n * k, group):
    ids = range(g0, g0 + group)
    for dest in range(num_devices):
      mine = [i for i in ids if ex[i] // per_dev == dest]
      guarded = [i for i in mine if aff[i] == np.inf]
      rest = sorted((i for i in mine if aff[i] != np.inf), key=lambda i: (-aff[i], i))
      for i in guarded + rest[:max(0, budget - len(guarded))]:
        kept[i] = True
  return kept.reshape(n, k)


def _shards(mesh_shape):
  return 1 if mesh_shape is None else math.prod(mesh_shape[:3])


def _run(cfg, p, mesh_shape, *, drop=True, grads_of=None):
  """(out, kept) of experts_forward under jit; with grads_of=proj also the gradients of
  sum(out * proj) w.r.t. x, w_gate, w_up, w_down."""
  def fwd(*a):
    return experts_forward(cfg, *a, impl=get_moe_impl("ragged"), dtype=jnp.float32,
                           return_kept=True)

  def loss(*a):
    y, kept = fwd(*a)
    return jnp.sum(y * grads_of), (y, kept)

  with contextlib.ExitStack() as stack:
    if mesh_shape is not None:
      stack.enter_context(jax.set_mesh(_mesh(*mesh_shape)))
    if drop:
      stack.enter_context(token_dropping())
    if grads_of is None:
      return jax.tree.map(np.asarray, jax.jit(fwd)(*_args(p)))
    g, (y, kept) = jax.jit(jax.grad(loss, argnums=(0, 4, 5, 6), has_aux=True))(*_args(p))
  return np.asarray(y), np.asarray(kept), [np.asarray(a) for a in g]


@pytest.fixture
def emulated_ragged(monkeypatch):
  """Route expert-parallel dispatch through ragged_all_to_all, emulated with all_to_all."""

  def emulation(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                axis_name):
    p, n = input_offsets.shape[0], operand.shape[0]
    i = jnp.arange(n)
    ok = i[None, :] < send_sizes[:, None]
    src = jnp.clip(input_offsets[:, None] + i[None, :], 0, n - 1)
    extra = (None,) * (operand.ndim - 1)
    chunks = jnp.where(ok[(...,) + extra], operand[src], 0)               # [P, n, ...]
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    tgt = jnp.where(i[None, :] < recv_sizes[:, None], where[:, None] + i[None, :],
                    output.shape[0])
    return output.at[tgt.reshape(-1)].set(recv.reshape((p * n,) + operand.shape[1:]),
                                          mode="drop")

  monkeypatch.setattr(dispatch, "ragged_all_to_all", emulation)
  monkeypatch.setattr(expert, "ragged_platform", lambda: True)


# ------------------------------------------------------------------------------ device rule


@pytest.mark.parametrize("mesh_shape,capacity_factor", [
    (None, 0.75), (None, 1.0), ((2, 2, 2, 1), 1.0), ((1, 2, 4, 1), 0.75), ((1, 1, 4, 2), 1.0),
    ((1, 1, 8, 1), 1.0)])
def test_device_rule_keeps_what_numpy_keeps(mesh_shape, capacity_factor):
  n = 64
  num_devices = 1 if mesh_shape is None else mesh_shape[2]
  p = _problem(70 + num_devices, n, bias=SKEW)
  out, kept = _run(_cfg(capacity_factor=capacity_factor), p, mesh_shape)
  n_local = n // _shards(mesh_shape)
  ref = _np_device_kept(p["experts"], p["affinity"], n_local=n_local, num_devices=num_devices,
                        capacity_factor=capacity_factor)
  # one device at c >= 1 has room for all its copies; otherwise the skew overflows device 0
  assert ref.all() == (num_devices == 1 and capacity_factor >= 1)
  if num_devices > 1:   # and the two rules keep different copies here
    pair = _np_kept(p["experts"], p["affinity"], n_local=n_local, num_devices=num_devices,
                    capacity_factor=capacity_factor)
    assert (pair != ref).any() and ref.sum() >= pair.sum()
  np.testing.assert_array_equal(kept, ref)
  assert _rel(out, _np_moe(p, ref)) <= 1e-5


def test_device_rule_ties_break_by_global_copy_index():
  n = 64
  p = _problem(80, n, bias=np.array([1.5, 1.5, 0, 0, 0, 0, 0, 0]))
  p["affinity"] = np.random.default_rng(81).choice(np.array([0.25, 0.5, 0.75], np.float32),
                                                   size=(n, K))
  out, kept = _run(_cfg(capacity_factor=0.75), p, MESHES[4])
  ref = _np_device_kept(p["experts"], p["affinity"], n_local=n // 8, num_devices=4,
                        capacity_factor=0.75)
  assert not ref.all()
  np.testing.assert_array_equal(kept, ref)
  assert _rel(out, _np_moe(p, ref)) <= 1e-5


@pytest.mark.parametrize("rule", ["device", "pair"])
def test_guarded_copies_are_never_dropped(rule):
  """+inf affinity (what MoE gives the guarded rows' tokens) is kept even past the budget."""
  # a third of the tokens guarded: past the budget
  _check_guarded(rule, seed=90, every=3, capacity_factor=0.5, num_devices=4)


def _check_guarded(rule, *, seed, every, capacity_factor, num_devices, n=64):
  """Every `every`-th token guarded (+inf affinity): all guarded copies kept, some others
  dropped, the device rule's kept set equal to numpy's, the output the kept copies' MoE."""
  p = _problem(seed, n, bias=SKEW)
  guard = np.zeros((n, K), bool)
  guard[::every] = True
  p["affinity"] = np.where(guard, np.inf, p["affinity"]).astype(np.float32)
  out, kept = _run(_cfg(capacity_factor=capacity_factor, capacity_rule=rule), p,
                   MESHES[num_devices])
  assert kept[guard].all() and not kept.all()
  if rule == "device":
    ref = _np_device_kept(p["experts"], p["affinity"], n_local=n // 8, num_devices=num_devices,
                          capacity_factor=capacity_factor)
    np.testing.assert_array_equal(kept, ref)
  assert _rel(out, _np_moe(p, kept)) <= 1e-5


def test_device_rule_gradients_match_unsharded_when_nothing_drops():
  n = 64
  p = _problem(100, n)
  proj = jnp.asarray(np.random.default_rng(101).normal(size=(n, DIM)), jnp.float32)
  ref, _, g_ref = _run(_cfg(), p, None, drop=False, grads_of=proj)
  out, kept, g = _run(_cfg(capacity_factor=4.0), p, MESHES[4], grads_of=proj)
  assert kept.all()
  assert _rel(out, ref) <= 1e-5
  for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), g, g_ref):
    assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_guarded_rows_fraction():
  rows = guarded_rows(1000, 0.1)
  assert abs(int(rows.sum()) - 100) <= 2
  for block in (8, 16, 32):                  # every device's / micro-batch's share is close
    per = rows[:992].reshape(-1, block).sum(axis=1)
    assert per.max() - per.min() <= 2, (block, per)
  assert not guarded_rows(64, 0.0).any() and guarded_rows(64, 1.0).all()


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 4, 1)])
def test_model_guarded_rows_never_drop_and_drops_are_counted(mesh_shape):
  cfg = get_config("tiny", num_hidden_layers=2, capacity_factor=0.5,
                   capacity_guard_fraction=0.25)
  graphdef, state = random_model_state(cfg, 3)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (8, 16)), jnp.int32)
  seg = np.ones((8, 16), np.int32)
  seg[1, 12:] = 0

  def fwd(s):
    _, aux = nnx.merge(graphdef, s)(ids, jnp.asarray(seg), return_aux=True)
    return aux["router"][0]["dropped"][0], aux["router"][0]["tokens"][0]

  mesh = contextlib.nullcontext() if mesh_shape is None else jax.set_mesh(_mesh(*mesh_shape))
  with mesh, token_dropping():
    dropped, tokens = jax.jit(fwd)(state)
  dropped = np.asarray(dropped)
  guard = guarded_rows(8, 0.25)
  assert guard.any() and (~guard).any()
  assert (dropped[guard] == 0).all() and dropped[~guard].sum() > 0
  if mesh_shape is not None:
    return
  # c = 0.5 on one device: 128 of 256 copies kept (the guarded 64 among them); the 4 padding
  # tokens' 8 copies go first and are not counted
  assert float(dropped.sum()) == 8 * 16 * K / 2 - 4 * K
  # outside token_dropping: dropless (a new jit: the context is read at trace time)
  eval_dropped, _ = jax.jit(lambda s: fwd(s))(state)
  assert float(np.asarray(eval_dropped).sum()) == 0.0


def test_drop_fraction_metrics_per_layer():
  """The objective's metrics, accumulated over 2 micro-batches: drop_fraction/layer_<i> for the
  MoE layers (1 and 2 of tiny's 3) and their mean; c = 0.5 on one device drops exactly half of
  every micro-batch's copies (its guarded rows fit in the budget), nothing outside
  token_dropping."""
  from coder_jax.train.step import lm_objective
  cfg = get_config("tiny", capacity_factor=0.5)
  graphdef, state = random_model_state(cfg, 5)
  rng = np.random.default_rng(6)
  ids = rng.integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
  batch = dict(inputs=ids, targets=ids, segment_ids=np.ones_like(ids),
               positions=np.tile(np.arange(16, dtype=np.int32), (8, 1)),
               loss_weights=np.ones(ids.shape, np.float32))
  obj = lm_objective(cfg)
  norms = obj.norms(batch)

  def metrics(drop):
    one = jax.jit(lambda s, mb: obj.loss_fn(nnx.merge(graphdef, s), mb, norms)[1])
    with token_dropping(drop):
      parts = [one(state, {k: v[r::2] for k, v in batch.items()}) for r in range(2)]
    total = jax.tree.map(jnp.add, *parts)
    return {k: np.asarray(v) for k, v in obj.finalize(total, norms).items()}

  m = metrics(True)
  assert sorted(k for k in m if k.startswith("drop_fraction")) == [
      "drop_fraction", "drop_fraction/layer_1", "drop_fraction/layer_2"]
  for k in ("drop_fraction", "drop_fraction/layer_1", "drop_fraction/layer_2"):
    assert float(m[k]) == 0.5, (k, m[k])
  assert float(metrics(False)["drop_fraction"]) == 0.0


# ------------------------------------------------------------------------------ bounded buffers


@pytest.mark.parametrize("transport,headroom", [("all_to_all", 1.0), ("all_to_all", None),
                                                ("ragged", 1.0)])
def test_dropless_bounded_buffers_overflow_is_exact(transport, headroom, request):
  """Skewed routing overflows the headroom: later rounds carry the rest, outputs and gradients
  equal the unsharded MoE."""
  if transport == "ragged":
    request.getfixturevalue("emulated_ragged")
  n = 64
  p = _problem(110, n, bias=SKEW)
  proj = jnp.asarray(np.random.default_rng(111).normal(size=(n, DIM)), jnp.float32)
  ref, _, g_ref = _run(_cfg(), p, None, drop=False, grads_of=proj)
  assert _rel(ref, _np_moe(p, np.ones((n, K), bool))) <= 1e-5
  cfg = _cfg(dispatch_headroom=headroom)
  out, kept, g = _run(cfg, p, MESHES[8], drop=False, grads_of=proj)
  assert kept.all()
  assert _rel(out, ref) <= 1e-5
  for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), g, g_ref):
    assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_skewed_routing_needs_overflow_rounds():
  """The case above does overflow: the busiest pair / receiver exceeds the 1.0 x window."""
  n, num_devices = 64, 8
  p = _problem(110, n, bias=SKEW)
  m = n // num_devices * K
  dest = p["experts"].reshape(num_devices, -1) // (E // num_devices)
  pair = max(np.bincount(row, minlength=num_devices).max() for row in dest)
  recv = np.bincount(dest.reshape(-1), minlength=num_devices).max()
  assert pair > dispatch_window(m, num_devices, rule=None, budget=0, headroom=1.0, ragged=False)
  assert recv > 2 * dispatch_window(m, num_devices, rule=None, budget=0, headroom=1.0,
                                    ragged=True)


@pytest.mark.parametrize("rule", ["device", "pair"])
def test_capacity_through_ragged_transport(emulated_ragged, rule):
  _check_guarded(rule, seed=120, every=4, capacity_factor=0.75, num_devices=8)


def test_window_sizes():
  # dropless: headroom x balanced load (m per receiver, m / P per pair), at most the worst case
  assert dispatch_window(16, 8, rule=None, budget=0, headroom=2.0, ragged=True) == 32
  assert dispatch_window(16, 8, rule=None, budget=0, headroom=2.0, ragged=False) == 4
  assert dispatch_window(16, 8, rule=None, budget=0, headroom=None, ragged=True) == 128
  assert dispatch_window(16, 8, rule=None, budget=0, headroom=None, ragged=False) == 16
  assert dispatch_window(16, 8, rule=None, budget=0, headroom=100.0, ragged=False) == 16
  # device rule: the budget per receiver; pair rule: its own pair budget
  assert device_budget(16, 8, 1.0) == 16 and device_budget(16, 8, 1.3) == 21
  assert device_budget(16, 2, 5.0) == 32
  assert dispatch_window(16, 8, rule="device", budget=16, headroom=2.0, ragged=True) == 16
  assert dispatch_window(16, 8, rule="device", budget=16, headroom=2.0, ragged=False) == 4
  assert dispatch_window(16, 8, rule="pair", budget=2, headroom=2.0, ragged=False) == 2
  assert dispatch_window(16, 8, rule="pair", budget=2, headroom=2.0, ragged=True) == 16


@pytest.mark.parametrize("field,value", [
    ("capacity_rule", "receiver"), ("capacity_rule", None),
    ("capacity_guard_fraction", -0.1), ("capacity_guard_fraction", 1.5),
    ("capacity_guard_fraction", "0.1"), ("dispatch_headroom", 0.5),
    ("dispatch_headroom", 0), ("dispatch_headroom", float("inf")), ("dispatch_headroom", True),
    ("capacity_factor", 0.0), ("capacity_factor", float("nan"))])
def test_bad_dispatch_config_values(field, value):
  with pytest.raises(ConfigError, match=f"^{field}: "):
    get_config("tiny", **{field: value})


# ------------------------------------------------------------------------------ TPU


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_ragged_path_compiles_for_tpu(capacity_factor):
  """Forward + backward of the routed experts for a 4-chip v5p topology (expert = 4): the target
  platform picks ragged_all_to_all, and libtpu compiles it (dropless: no fixed all_to_all left;
  device rule: the affinity exchange is the fixed-size one)."""
  import re
  from jax.sharding import NamedSharding
  from coder_jax.parallel.mesh import MeshConfig
  from coder_jax.parallel.rules import logical_to_spec
  from coder_jax.train import aot
  if aot.libtpu_path() is None:
    pytest.skip("libtpu is not installed: " + aot.install_hint())
  mesh = aot.topology_mesh(MeshConfig(expert=4), aot.parse_topology("v5p-8"))
  cfg = _cfg(capacity_factor=capacity_factor, hidden_size=128, moe_intermediate_size=128)
  n, d = 64, 128

  def sds(shape, dt, axes):
    return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(
        mesh, logical_to_spec(axes, shape, mesh)))

  tok = ("batch", None)
  args = [sds((n, d), jnp.bfloat16, tok), sds((n, K), jnp.int32, tok),
          sds((n, K), jnp.float32, tok), sds((n, K), jnp.float32, tok)] + [
      sds((E, d, d), jnp.bfloat16, ("experts", None, "expert_mlp"))] * 3

  def loss(x, ex, w, a, g, u, dn):
    y = experts_forward(cfg, x, ex, w, a, g, u, dn, impl=get_moe_impl("ragged"),
                        dtype=jnp.bfloat16)
    return y.astype(jnp.float32).sum()

  with jax.set_mesh(mesh), aot.no_persistent_cache(), token_dropping():
    assert expert.ragged_platform()
    hlo = jax.jit(jax.grad(loss, argnums=(0, 4, 5, 6))).lower(*args).compile().as_text()
  ragged = len(re.findall(r"\bragged-all-to-all\(", hlo))
  # fixed all_to_alls left: offsets (s32[4], ragged_all_to_all's transpose) and, under the device
  # rule, the affinity lists (f32[4, budget]); never token rows
  fixed = re.findall(r"= (\S+) all-to-all\(", hlo)
  assert ragged >= 6, ragged                      # out + back, in round 0 and the later rounds
  assert all(t.startswith(("s32[", "f32[4,")) for t in fixed), fixed
  assert any(t.startswith("f32[4,") for t in fixed) == (capacity_factor is not None), fixed
