"""Context parallelism (model/context.py) on 8 fake CPU devices.

The loss, each of its terms (cross-entropy, balance losses) and every gradient with the
sequence split over `context` (2, 4, 8; alone, with fsdp, expert, tensor) equal the unsharded
computation (float32, rel <= 1e-5), through the XLA attention and the Pallas Triton kernel in
interpret mode (both
kernels' queries-shorter-than-keys path, the one used here, is tested against the reference
in test_kernels_attention.py). Rows 0-1 are packed (several documents, padding), rows 2-3 one
document each (the same as no segment ids). The compiled program communicates the latent +
rope key, never per-head keys or values. Errors: a context axis that does not divide the
sequence (check_fit and the model), decoding on a context mesh, a kernel run per shard over
a split length.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coder_jax.model import context
from coder_jax.model.config import get_config
from coder_jax.model.decoder import init_model
from coder_jax.parallel.mesh import MeshConfig, MeshError, abstract_mesh, check_fit, make_mesh
from coder_jax.train.data import SyntheticData
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.state import abstract_model, param_specs, to_shardings
from coder_jax.train.step import lm_objective
from random_params import graph_and_params

ALPHAS = BalanceLossConfig(expert_alpha=0.003, device_alpha=0.05, comm_alpha=0.02)
# One MoE layer (attention + routed and shared experts): one scanned body to compile.
CFG = get_config("tiny", moe_impl="dense", num_hidden_layers=1, first_k_dense_replace=0,
                 routing_devices=4, routing_device_limit=2, capacity_factor=None, v_head_dim=18)
# SEQ and heads x head dims (4 or 2 heads x 24 / 18) match no other dimension of the model.
ROWS, SEQ = 4, 80
LATENT = CFG.kv_lora_rank + CFG.qk_rope_head_dim


def _batch():
  stream = SyntheticData(seed=3).open(model_vocab=CFG.vocab_size, batch_rows=ROWS, seq_len=SEQ,
                                      shard=0, num_shards=1, start_batch=0)
  b = {k: v.copy() for k, v in next(stream).items()}
  b["segment_ids"][2:] = 1                    # unpacked rows
  b["positions"][2:] = np.arange(SEQ)
  b["loss_weights"][2:] = 1
  assert len(np.unique(b["segment_ids"][0])) > 2 and (b["segment_ids"][:2] == 0).any()
  return b


def _loss_fn(cfg, graphdef):
  objective = lm_objective(cfg, ALPHAS)

  def fn(params, batch):
    loss_fn = lambda p: objective.loss_fn(nnx.merge(graphdef, p), batch, objective.norms(batch))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)
  return fn


@pytest.fixture(scope="module")
def reference():
  graphdef, params = graph_and_params(init_model(CFG, seed=1))
  batch = _batch()
  (loss, metrics), grads = jax.jit(_loss_fn(CFG, graphdef))(params, batch)
  return graphdef, params, batch, loss, metrics, grads


def _collectives(hlo: str):
  """(op, shape dims) of every all-gather / all-to-all / collective-permute / reduce-scatter."""
  out = []
  for m in re.finditer(r"= \(?([^=]*?)\)? (all-gather|all-to-all|collective-permute|"
                       r"reduce-scatter)(?:-start)?\(", hlo):
    for shape in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
      out.append((m.group(2), tuple(int(d) for d in shape.split(",") if d)))
  return out


# Context 2, 4 and 8 each through the XLA attention and the Triton kernel; each size alone and
# (2 and 4; 8 takes every device) with fsdp / expert / tensor, each attention alone and combined.
# The TPU kernel's interpreter takes 36 s a case here: its queries-shorter-than-keys path is
# tested in test_kernels_attention.py, and the model with it in test_kernels_model.py.
@pytest.mark.parametrize("mesh_cfg, impl", [
    (MeshConfig(context=2, fsdp=1), "reference"),
    (MeshConfig(context=2, expert=2, tensor=2, fsdp=1), "pallas_triton"),
    (MeshConfig(context=2, fsdp=2, expert=2), "pallas_triton"),
    (MeshConfig(context=4, fsdp=1), "pallas_triton"),
    (MeshConfig(context=4, fsdp=2), "reference"),
    (MeshConfig(context=8, fsdp=1), "reference"),
    (MeshConfig(context=8, fsdp=1), "pallas_triton"),
], ids=lambda x: x if isinstance(x, str) else f"c{x.context}f{x.fsdp}e{x.expert}t{x.tensor}")
def test_loss_and_grads_equal_unsharded(reference, mesh_cfg, impl):
  graphdef, params, batch, ref_loss, ref_metrics, ref_grads = reference
  cfg = dataclasses.replace(CFG, attention_impl=impl)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg, seed=1)))
  n = mesh_cfg.context * mesh_cfg.fsdp * mesh_cfg.expert * mesh_cfg.tensor
  mesh = make_mesh(mesh_cfg, jax.devices()[:n])   # context alone: on the first 2 or 4 devices
  check_fit(mesh, cfg, batch_size=ROWS, seq_len=SEQ)
  shardings = to_shardings(param_specs(abstract_model(cfg)[1], mesh), mesh)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    step = jax.jit(_loss_fn(cfg, graphdef), out_shardings=((None, None), shardings))
    compiled = step.lower(sharded, batch).compile()
    (loss, metrics), grads = compiled(sharded, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for (path, m_ref), m in zip(jax.tree_util.tree_leaves_with_path(ref_metrics),
                              jax.tree.leaves(metrics)):   # some are dicts (moe_drops)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  for (path, g_ref), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                              jax.tree.leaves(grads)):
    g_ref, g = np.asarray(g_ref), np.asarray(g)
    assert np.abs(g - g_ref).max() <= 1e-5 * (np.abs(g_ref).max() + 1e-12), \
        jax.tree_util.keystr(path)
  # Only the latent (+ rope key) of the sequence crosses devices, never per-head keys / values.
  coll = _collectives(compiled.as_text())
  h = CFG.num_attention_heads // mesh_cfg.tensor
  for op, dims in coll:
    if SEQ in dims[:-1]:    # a sequence's worth of something (weights have no such dim)
      assert dims[-2:] not in ((h, CFG.qk_head_dim), (h, CFG.v_head_dim)), (op, dims)
      assert dims[-1] not in (h * CFG.qk_head_dim, h * CFG.v_head_dim), (op, dims)
  assert any(op == "all-gather" and dims[-2:] == (SEQ, LATENT) for op, dims in coll), coll


def test_balanced_layout_round_trips():
  """Device d of n holds chunks d and 2n-1-d; from_balanced undoes to_balanced."""
  n, c = 4, 3
  x = jnp.arange(2 * 2 * n * c).reshape(2, 2 * n * c)
  y = np.asarray(context.to_balanced(x, n))
  for d in range(n):
    shard = y[0, d * 2 * c:(d + 1) * 2 * c]
    assert list(shard) == list(range(d * c, (d + 1) * c)) + \
        list(range((2 * n - 1 - d) * c, (2 * n - d) * c))
  np.testing.assert_array_equal(np.asarray(context.from_balanced(jnp.asarray(y), n)), x)


def test_check_fit_names_the_numbers():
  mesh = abstract_mesh(MeshConfig(context=4, fsdp=2), 8)
  with pytest.raises(MeshError, match=r"seq_len=36 is not divisible by 2 x the context axis "
                                      r"\(4\) = 8"):
    check_fit(mesh, CFG, batch_size=8, seq_len=36)
  check_fit(mesh, CFG, batch_size=8, seq_len=40)
  # Without a context split any length fits (the tiny GRPO chain's rows are 191 tokens).
  check_fit(abstract_mesh(MeshConfig(fsdp=8), 8), CFG, batch_size=8, seq_len=191)


def test_model_rejects_indivisible_length_decoding_and_split_kernels():
  model = init_model(CFG, seed=0)
  mesh = make_mesh(MeshConfig(context=4, fsdp=2))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"seq_len=12 is not divisible by 2 x the context axis "
                                         r"\(4\) = 8"):
      model(jnp.zeros((2, 12), jnp.int32))
    with pytest.raises(ValueError, match="latent cache .* context axis is 1; this mesh has "
                                         "context=4"):
      model.hidden_states(jnp.zeros((2, 16), jnp.int32), return_cache=True)
    with pytest.raises(ValueError, match="shared prefix needs a mesh whose context axis is 1; "
                                         "this mesh has context=4"):
      model.hidden_states(jnp.zeros((2, 16), jnp.int32), prefix=([], jnp.ones((1, 4)), 2))
    # token_logprobs' group then runs every row in full instead of failing.
    from coder_jax.model.logprobs import _shares_prefix
    assert not _shares_prefix(model, jnp.zeros((4, 16), jnp.int32), 7, 2)
    attn = model.stacks[0].layers.self_attn
    one = lambda *s: jnp.zeros(s, jnp.float32)
    with pytest.raises(ValueError, match="decoding runs on a mesh whose context axis is 1"):
      attn.decode(one(2, 1, CFG.hidden_size), None, None, None, None,
                  jnp.zeros((2,), jnp.int32), None)
    from coder_jax.model import get_attention_impl
    q = one(2, 16, CFG.num_attention_heads, CFG.qk_head_dim)
    v = one(2, 16, CFG.num_attention_heads, CFG.v_head_dim)
    seg = jnp.ones((2, 16), jnp.int32)
    with pytest.raises(ValueError, match="split over the context axis \\(4\\)"):
      get_attention_impl("pallas")(q, q, v, q_segment_ids_BT=seg, kv_segment_ids_BS=seg,
                                   scale=1.0)
