"""Parity with transformers' DeepseekV2ForCausalLM (fp32, relative logits error <= 1e-4), both ways:
HF -> hf.load -> our logits; ours -> hf.save -> from_pretrained -> the same logits; and
save -> load is bit-exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV2ForCausalLM

from coder_jax import hf
from hf_oracle import hf_logits, random_hf_model, rel_err

TOL = 1e-4
LITE_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                 original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                 mscale=0.707, mscale_all_dim=0.707)

CASES = {
    "qlora_null_greedy": dict(),
    "qlora_group_limited": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                topk_group=2, num_experts_per_tok=3),
    "yarn_small_window": dict(rope_parameters=dict(LITE_YARN, factor=8.0,
                                                   original_max_position_embeddings=32),
                              max_position_embeddings=256),
    "dense_first_3_of_5": dict(num_hidden_layers=5, first_k_dense_replace=3),
    "routed_scaling_16": dict(routed_scaling_factor=16.0, n_routed_experts=16, n_group=4,
                              topk_group=3, topk_method="group_limited_greedy",
                              num_experts_per_tok=4, q_lora_rank=40),
    "no_shared_experts_tied": dict(n_shared_experts=0, tie_word_embeddings=True),
    "all_moe_layers": dict(first_k_dense_replace=0, num_hidden_layers=2, rms_norm_eps=1e-5),
    "dense_only": dict(first_k_dense_replace=9, num_hidden_layers=2),
}


def _ids(seed, batch=2, length=70, vocab=300):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _params(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_directions(name, tmp_path):
  ref_model = random_hf_model(seed=len(name), **CASES[name])
  ref_model.save_pretrained(tmp_path / "hf")
  ids = _ids(len(name))
  ref = hf_logits(ref_model, ids)

  ours = hf.load(str(tmp_path / "hf"), dtype=jnp.float32)
  got = np.asarray(ours(jnp.asarray(ids)))
  assert got.shape == ref.shape
  assert rel_err(got, ref) <= TOL

  hf.save(ours, str(tmp_path / "back"))
  again = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert rel_err(hf_logits(again, ids), got) <= TOL

  reloaded = hf.load(str(tmp_path / "back"))
  for a, b in zip(_params(ours), _params(reloaded)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("offset", [4000, 20000, 150000])
def test_lite_yarn_past_original_window(offset, tmp_path):
  """Lite's real YaRN values with positions past original_max_position_embeddings (4096)."""
  ref_model = random_hf_model(seed=7, rope_parameters=dict(LITE_YARN),
                              max_position_embeddings=163840)
  ref_model.save_pretrained(tmp_path)
  ids = _ids(3, batch=1, length=40)
  # Spread positions (RoPE is relative: a common shift alone would change nothing).
  pos = offset + 97 * np.arange(40)[None]
  with torch.no_grad():
    ref = ref_model(torch.as_tensor(ids), position_ids=torch.as_tensor(pos)).logits.numpy()
  ours = hf.load(str(tmp_path))
  got = np.asarray(ours(jnp.asarray(ids), positions_BT=jnp.asarray(pos)))
  assert rel_err(got, ref) <= TOL
  # The positions matter: the same tokens at positions 0, 1, ... give different logits.
  assert rel_err(np.asarray(ours(jnp.asarray(ids))), ref) > 1e-3


def test_remote_code_dialect_loads_same_model(tmp_path):
  """A config.json written like the released DeepSeek checkpoints (rope_scaling, auto_map, ...)."""
  ref_model = random_hf_model(seed=11, rope_parameters=dict(LITE_YARN, factor=8.0,
                                                            original_max_position_embeddings=32),
                              max_position_embeddings=256, q_lora_rank=24)
  ref_model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  rope["type"] = rope.pop("rope_type")
  cfg.update(rope_scaling=rope, scoring_func="softmax", ep_size=1, moe_layer_freq=1,
             auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
             aux_loss_alpha=0.001, seq_aux=True, norm_topk_prob=False)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  ids = _ids(5)
  got = np.asarray(hf.load(str(tmp_path))(jnp.asarray(ids)))
  assert rel_err(got, hf_logits(ref_model, ids)) <= TOL


def test_bf16_load_tracks_fp32(tmp_path):
  ref_model = random_hf_model(seed=3)
  ref_model.save_pretrained(tmp_path)
  ids = _ids(9)
  ref = hf_logits(ref_model, ids)
  got = np.asarray(hf.load(str(tmp_path), dtype=jnp.bfloat16)(jnp.asarray(ids)))
  assert got.dtype == np.float32
  err = rel_err(got, ref)
  assert 1e-6 < err < 0.1  # bf16 rounding is visible but small


def test_sharded_load_on_a_mesh(tmp_path):
  """Loading onto a device mesh places each parameter by the logical-axis rules."""
  ref_model = random_hf_model(seed=13, n_routed_experts=8)
  ref_model.save_pretrained(tmp_path)
  devices = np.array(jax.devices()[:8]).reshape(1, 2, 2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "expert", "tensor"))
  ours = hf.load(str(tmp_path), mesh=mesh)
  experts = ours.stacks[1].layers.mlp.experts_gate_proj[...]
  assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  ids = _ids(2)
  assert rel_err(np.asarray(ours(jnp.asarray(ids))), hf_logits(ref_model, ids)) <= TOL


def test_save_from_a_sharded_model_is_exact(tmp_path):
  ref_model = random_hf_model(seed=17)
  ref_model.save_pretrained(tmp_path / "hf")
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2, 1)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "expert", "tensor"))
  sharded = hf.load(str(tmp_path / "hf"), mesh=mesh)
  hf.save(sharded, str(tmp_path / "out"), max_shard_size="50KB")
  plain = hf.load(str(tmp_path / "out"))
  for a, b in zip(_params(sharded), _params(plain)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_norm_topk_prob_follows_deepseek_and_warns(tmp_path):
  """transformers ignores norm_topk_prob; we keep DeepSeek-V2's rule and say so on load."""
  ref_model = random_hf_model(seed=19, norm_topk_prob=True, routed_scaling_factor=3.0)
  ref_model.save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="norm_topk_prob"):
    ours = hf.load(str(tmp_path))
  ids = _ids(4)
  got = np.asarray(ours(jnp.asarray(ids)))
  assert rel_err(got, hf_logits(ref_model, ids)) > 1e-3
  with pytest.warns(UserWarning, match="norm_topk_prob"):
    hf.save(ours, str(tmp_path / "out"))
