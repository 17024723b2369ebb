"""One step's loss and gradients on 8 fake devices equal the single-device ones (float32,
rel <= 1e-5) for data, FSDP, expert and tensor parallel meshes, balance losses included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coder_jax.model.config import get_config
from coder_jax.model.decoder import init_model
from coder_jax.parallel.mesh import MeshConfig, make_mesh
from coder_jax.train.data import SyntheticData
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.state import param_specs, abstract_model, to_shardings
from coder_jax.train.step import loss_and_grads
from random_params import graph_and_params

ALPHAS = BalanceLossConfig(expert_alpha=0.003, device_alpha=0.05, comm_alpha=0.02)
CFG = get_config("tiny", moe_impl="tiled", num_hidden_layers=3, routing_devices=4,
                 routing_device_limit=2, capacity_factor=None)


def _batch(seed=3):
  stream = SyntheticData(seed=seed).open(model_vocab=CFG.vocab_size, batch_rows=8, seq_len=24,
                                         shard=0, num_shards=1, start_batch=0)
  b = next(stream)
  b = {k: v.copy() for k, v in b.items()}
  for k in b:  # one padding row
    b[k][5] = 0
  return b


@pytest.fixture(scope="module")
def reference():
  graphdef, params = graph_and_params(init_model(CFG, seed=1))
  batch = _batch()
  loss, grads = jax.jit(lambda p, b: loss_and_grads(graphdef, CFG, p, b, ALPHAS))(params, batch)
  return graphdef, params, batch, loss, grads


@pytest.mark.parametrize("mesh_cfg", [
    MeshConfig(data=8, fsdp=1), MeshConfig(fsdp=8), MeshConfig(fsdp=2, expert=4),
    MeshConfig(data=2, expert=2, tensor=2, fsdp=1), MeshConfig(fsdp=2, tensor=4),
    MeshConfig(expert=4, tensor=2, fsdp=1),
], ids=lambda m: f"d{m.data}f{m.fsdp}e{m.expert}t{m.tensor}")
def test_loss_and_grads_equal_single_device(reference, mesh_cfg):
  graphdef, params, batch, ref_loss, ref_grads = reference
  mesh = make_mesh(mesh_cfg)
  _, abstract_state = abstract_model(CFG)
  shardings = to_shardings(param_specs(abstract_state, mesh), mesh)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    step = jax.jit(lambda p, b: loss_and_grads(graphdef, CFG, p, b, ALPHAS),
                   out_shardings=(None, shardings))
    loss, grads = step(sharded, batch)
  if mesh_cfg.expert > 1:  # the experts really are split over devices
    w = sharded["stacks"][1]["layers"]["mlp"]["experts_gate_proj"]
    assert w.sharding.shard_shape(w.shape)[1] == CFG.n_routed_experts // mesh_cfg.expert
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  for (path, g_ref), g in zip(flat_ref, flat):
    g_ref, g = np.asarray(g_ref), np.asarray(g)
    scale = np.abs(g_ref).max() + 1e-12
    assert np.abs(g - g_ref).max() <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("impl", ["tiled", "ragged"])
def test_moe_runs_on_local_tokens_without_expert_parallelism(impl):
  """fsdp=8, expert=1: each device sorts and computes only its own token copies (automatic
  partitioning would gather the routing and run the experts on the global batch everywhere)."""
  from coder_jax.model.moe import get_moe_impl, route
  from coder_jax.parallel.expert import experts_forward
  cfg = get_config("tiny", moe_impl=impl)
  rng = np.random.default_rng(0)
  # 512 tokens a device: enough that `tiled` sorts and scans (a few take its dense path).
  n, e, d, f = 4096, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  r = route(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), cfg)
  w = [jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  aff = jnp.take_along_axis(r.scores_NE, r.experts_NK, axis=-1)
  fn = lambda *a: experts_forward(cfg, *a, impl=get_moe_impl(impl), dtype=jnp.float32)
  ref = fn(x, r.experts_NK, r.weights_NK, aff, *w)
  mesh = make_mesh(MeshConfig(fsdp=8))
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn)
    hlo = jitted.lower(x, r.experts_NK, r.weights_NK, aff, *w).compile().as_text()
    out = jitted(x, r.experts_NK, r.weights_NK, aff, *w)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
  sorts = [l for l in hlo.splitlines() if " sort(" in l]
  assert sorts and all(f"[{n * cfg.num_experts_per_tok}]" not in l for l in sorts), sorts
