"""The long-context stage: the sequence-chunked loss against the plain one (values, gradients,
compiled memory), RoPE scaling changed only when a stage states it (HF and training-checkpoint
starts, checked against transformers' DeepseekV2 with the new YaRN scaling), resumes that would
change it refused, too-long sequences refused before compiling, and the gin files' dry runs."""

import functools
import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from coder_jax import hf
from coder_jax import main as entry
from coder_jax.model import get_config, init_model, segment_positions
from coder_jax.model.config import ConfigError, YarnConfig
from coder_jax.parallel.mesh import MeshConfig, make_mesh
from coder_jax.stages.pretrain import pretrain
from coder_jax.train.checkpoint import load_params, read_model_config
from coder_jax.train.data import SyntheticData
from coder_jax.train.loop import initial_params, position_overrides, resolve_model_config
from coder_jax.train.optim import OptimizerConfig
from coder_jax.train.state import abstract_model
from coder_jax.train.step import lm_objective
from hf_oracle import BASE, hf_logits, random_hf_model, rel_err
from random_params import graph_and_params

TINY = get_config("tiny", dtype="float32")
YARN = dict(factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
            mscale=0.707, mscale_all_dim=0.707)
# transformers 5 spelling of the same scaling.
HF_YARN = dict(rope_type="yarn", rope_theta=10000.0, **YARN)


def _batch(vocab, b=2, t=40, seed=0):
  """Packed rows (two documents; a padded tail) with some zero loss weights, as SFT makes."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  seg = np.array([[1] * 15 + [2] * (t - 15), [1] * (t - 10) + [0] * 10], np.int32)[:b]
  weights = (seg > 0).astype(np.int32)
  weights[0, :5] = 0
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
          "segment_ids": jnp.asarray(seg), "positions": segment_positions(jnp.asarray(seg)),
          "loss_weights": jnp.asarray(weights)}


# --- the chunked loss


@functools.lru_cache(maxsize=None)
def _loss_ce_grads(chunk):
  """(loss, logged cross-entropy, gradients) of one packed batch, the loss's logits computed
  `chunk` positions at a time (None: all at once)."""
  graphdef, params = graph_and_params(init_model(TINY, seed=3))
  batch = _batch(TINY.vocab_size)
  obj = lm_objective(TINY, loss_chunk_size=chunk)

  def loss(p):
    return obj.loss_fn(nnx.merge(graphdef, p), batch, obj.norms(batch))

  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, metrics["ce_loss"], grads


@pytest.mark.parametrize("chunk", [8, 13, 64], ids=["divides", "pads", "one_chunk"])
def test_chunked_loss_and_gradient_equal_the_plain_ones(chunk):
  want_loss, want_ce, want_grads = _loss_ce_grads(None)
  got_loss, got_ce, got_grads = _loss_ce_grads(chunk)
  assert rel_err(got_loss, want_loss) <= 1e-5 and rel_err(got_ce, want_ce) <= 1e-5
  leaves = list(zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)))
  assert len(leaves) > 10
  for g, w in leaves:
    if np.any(np.asarray(w)):
      assert rel_err(g, w) <= 1e-5


def test_chunked_loss_peak_memory_is_bounded_by_the_chunk():
  """Compiled loss + gradient of one 2048-token row, vocabulary 32000: XLA's temporary buffers
  beyond those of the same network without its head (the baseline) hold at least the whole
  [T, vocab] logits without chunking, and at most two chunks' worth with 128-position chunks."""
  vocab, t, chunk = 32000, 2048, 128
  cfg = get_config("tiny", dtype="float32", vocab_size=vocab, num_hidden_layers=1)
  graphdef, params = graph_and_params(init_model(cfg, seed=0))
  batch = _batch(vocab, b=1, t=t)

  def temp_bytes(loss):
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  def objective(c):
    obj = lm_objective(cfg, loss_chunk_size=c)
    return lambda p: obj.loss_fn(nnx.merge(graphdef, p), batch, obj.norms(batch))[0]

  def no_head(p):
    h, _ = nnx.merge(graphdef, p).hidden_states(batch["inputs"], batch["segment_ids"],
                                                batch["positions"])
    return jnp.sum(h)

  base = temp_bytes(no_head)
  plain, chunked = temp_bytes(objective(None)), temp_bytes(objective(chunk))
  logits_bytes, chunk_bytes = t * vocab * 4, chunk * vocab * 4
  assert plain - base >= logits_bytes, (plain, base)
  # Slack of one [T, hidden] float32 activation: the two programs are scheduled apart, and
  # which of the network's small buffers are live beside the head's differs (a [T, kv_lora]
  # one, 0.26 MB, since the projections flatten their token dims).
  slack = t * cfg.hidden_size * 4
  assert chunked - base <= 2 * chunk_bytes + slack, (chunked, base)


def test_loss_chunk_size_must_be_positive():
  for bad in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="loss_chunk_size: a positive number"):
      lm_objective(TINY, loss_chunk_size=bad)


# --- stating the positions a stage trains for


def test_model_overrides_name_what_is_wrong():
  with pytest.raises(ConfigError, match="state rope_scaling, max_position_embeddings together "
                                        r"\(missing max_position_embeddings\)"):
    position_overrides({"rope_scaling": YARN})
  with pytest.raises(ConfigError, match="model_overrides: hidden_size cannot be overridden"):
    position_overrides({"rope_scaling": None, "max_position_embeddings": 64, "hidden_size": 8})
  with pytest.raises(ConfigError, match=r"rope_scaling.factr is not a YaRN field"):
    position_overrides({"rope_scaling": {"factr": 4.0}, "max_position_embeddings": 64})
  with pytest.raises(ConfigError, match="max_position_embeddings must be a positive int"):
    position_overrides({"rope_scaling": None, "max_position_embeddings": "64k"})
  with pytest.raises(ConfigError, match=r"rope_scaling.factor: must be >= 1, got 0.5"):
    gin.clear_config()
    resolve_model_config(None, "float32", model_overrides={
        "rope_scaling": dict(YARN, factor=0.5), "max_position_embeddings": 64})
  got = position_overrides({"rope_scaling": YARN, "max_position_embeddings": 128})
  assert got == {"rope_scaling": YarnConfig(**YARN), "max_position_embeddings": 128}
  assert position_overrides(None) == {}


def test_hf_start_takes_the_stated_scaling_and_matches_transformers(tmp_path):
  """A stage starting from an HF checkpoint pretrained without YaRN: the architecture and
  weights are the checkpoint's, the positions the stage states; its logits at positions past
  the original window equal transformers' DeepseekV2 with those weights and that YaRN."""
  src = random_hf_model(seed=5, max_position_embeddings=32)
  src.save_pretrained(tmp_path / "hf")
  gin.clear_config()
  overrides = {"rope_scaling": YARN, "max_position_embeddings": 128}
  cfg = resolve_model_config(str(tmp_path / "hf"), "float32", model_overrides=overrides)
  assert cfg.rope_scaling == YarnConfig(**YARN) and cfg.max_position_embeddings == 128
  assert (cfg.vocab_size, cfg.num_hidden_layers) == (BASE["vocab_size"], 3)   # the checkpoint's
  assert resolve_model_config(str(tmp_path / "hf"), "float32").rope_scaling is None
  params = initial_params(cfg, make_mesh(MeshConfig(), jax.devices()[:1]),
                          init_from_hf=str(tmp_path / "hf"))
  ours = nnx.merge(abstract_model(cfg)[0], params)

  oracle = DeepseekV2ForCausalLM(DeepseekV2Config(**{
      **BASE, "max_position_embeddings": 128, "rope_parameters": HF_YARN})).eval()
  weights = {k: v for k, v in src.state_dict().items() if "rotary" not in k}
  missing, unexpected = oracle.load_state_dict(weights, strict=False)
  assert not unexpected and all("rotary" in k for k in missing)
  ids = np.random.default_rng(1).integers(0, BASE["vocab_size"], (2, 120))
  want = hf_logits(oracle, ids)
  assert rel_err(np.asarray(ours(jnp.asarray(ids))), want) <= 1e-4
  assert rel_err(hf_logits(src, ids), want) > 1e-3     # the scaling changed the function


def _train(model_dir, steps, seq_len, **kw):
  return pretrain(model_dir=str(model_dir), train_steps=steps, batch_size=8, seq_len=seq_len,
                  data=SyntheticData(), mesh_config=MeshConfig(), compute_dtype="float32",
                  checkpoint_every=1, async_checkpoints=False,
                  optimizer_config=OptimizerConfig(learning_rate=1e-3, warmup_steps=1), **kw)


def test_stage_from_a_training_run_changes_rope_only_when_stated(tmp_path):
  # Pretraining at 32 positions without YaRN (as DeepSeek at 4K).
  gin.clear_config()
  gin.bind_parameter("model_config.max_position_embeddings", 32)
  try:
    _train(tmp_path / "pre", 1, 32)
  finally:
    gin.clear_config()
  pre = str(tmp_path / "pre")
  assert read_model_config(pre)[0].rope_scaling is None

  # Longer sequences without stating new positions: refused before anything compiles.
  t0 = time.time()
  with pytest.raises(ConfigError, match=r"seq_len=64 exceeds max_position_embeddings=32 \(the "
                                        r"config of .*pre\); .* model_overrides"):
    _train(tmp_path / "long", 1, 64, init_from_checkpoint=pre)
  assert time.time() - t0 < 10 and not (tmp_path / "long").exists()

  stated = {"rope_scaling": YARN, "max_position_embeddings": 64}
  res = _train(tmp_path / "long", 1, 64, init_from_checkpoint=pre, model_overrides=stated,
               loss_chunk_size=16)
  assert np.isfinite(res["losses"][1])
  stored, _ = read_model_config(str(tmp_path / "long"))
  assert stored.rope_scaling == YarnConfig(**YARN) and stored.max_position_embeddings == 64
  assert stored.num_hidden_layers == res["model_config"].num_hidden_layers

  # What the stage trained is transformers' DeepseekV2 with that YaRN scaling.
  trained, _ = load_params(str(tmp_path / "long"))
  hf.save(trained, str(tmp_path / "hf"))
  rope = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
  assert {k: rope[k] for k in YARN} == YARN and rope["rope_type"] == "yarn"
  oracle = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
  ids = np.random.default_rng(2).integers(0, TINY.vocab_size, (1, 60))
  got = np.asarray(trained(jnp.asarray(ids)))
  assert rel_err(got, hf_logits(oracle, ids)) <= 1e-4

  # Resuming the stage with another scaling is refused, naming the field and both values.
  other = {"rope_scaling": dict(YARN, factor=2.0), "max_position_embeddings": 64}
  with pytest.raises(ConfigError, match=r"another model config \(rope_scaling: "
                                        r"YarnConfig\(factor=4.0.* -> YarnConfig\(factor=2.0"):
    _train(tmp_path / "long", 2, 64, init_from_checkpoint=pre, model_overrides=other)


def test_too_long_sequence_is_one_line_before_compiling(tmp_path, capsys):
  gin.clear_config()
  t0 = time.time()
  code = entry.run(["--gin_file=gin_configs/experiments/tiny_pretrain.gin",
                    f"--gin.MODEL_DIR='{tmp_path}'", "--gin.SEQ_LEN=4096",
                    "--gin.pretrain.data=@SyntheticData()"])
  gin.clear_config()
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
  assert code == 2 and len(err) == 1, err
  assert "seq_len=4096 exceeds max_position_embeddings=2048" in err[0]
  assert time.time() - t0 < 20 and not os.listdir(tmp_path)


def test_long_context_run_must_state_its_rope_scaling(tmp_path, capsys):
  gin.clear_config()
  code = entry.run(["--gin_file=gin_configs/models/tiny.gin",
                    "--gin_file=gin_configs/runs/long_context.gin", "--dry_run",
                    "--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'",
                    "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LONG_DOC_MIN_TOKENS=16",
                    "--gin.MAX_POSITION_EMBEDDINGS=64", f"--gin.INIT_FROM_CHECKPOINT='{tmp_path}'"])
  gin.clear_config()
  assert code == 2 and "ROPE_SCALING" in capsys.readouterr().err


# --- the gin files


@pytest.mark.parametrize("name", ["tiny_pretrain", "coder_v2_lite_pretrain", "coder_v2_pretrain"])
def test_pretraining_files_train_without_yarn(name):
  from coder_jax.gin_flags import parse
  from coder_jax.stages import register_all
  gin.clear_config()
  register_all()
  try:
    parse([f"gin_configs/experiments/{name}.gin"],
          ["MODEL_DIR='/tmp/unused'", "DATA_DIR='/tmp/unused'"], ["."])
    cfg = get_config()
  finally:
    gin.clear_config()
  assert cfg.rope_scaling is None
  assert cfg.max_position_embeddings == (2048 if name == "tiny_pretrain" else 4096)


def test_presets_keep_the_released_checkpoints_positions():
  for preset in ("coder_v2_lite", "coder_v2"):
    cfg = get_config(preset)
    assert cfg.rope_scaling == YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                                          mscale_all_dim=0.707)
    assert cfg.max_position_embeddings == 163840


@pytest.mark.parametrize("name, devices, micro_rows, tensor, seq_len", [
    ("coder_v2_lite_32k", 32, 32, 1, 32768),
    ("coder_v2_lite_128k", 32, 32, 1, 131072),
    ("coder_v2_128k", 256, 32, 8, 131072),
])
def test_long_context_experiments_dry_run_on_their_meshes(name, devices, micro_rows, tensor,
                                                          seq_len, capsys):
  gin.clear_config()
  try:
    report = entry.main([f"--gin_file=gin_configs/experiments/{name}.gin", "--dry_run",
                         "--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'",
                         "--gin.INIT_FROM_CHECKPOINT='/not/here'",
                         f"--gin.pretrain.dry_run_devices={devices}"])
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  assert report["num_devices"] == devices and report["mesh"]["tensor"] == tensor
  assert report["rope_scaling"] == YarnConfig(factor=40.0, original_max_position_embeddings=4096)
  assert report["max_position_embeddings"] == 163840
  # One sequence per batch shard; the loss holds 2048 positions of its vocabulary share.
  shards = devices // tensor
  assert micro_rows % shards == 0
  per_row = 102400 // tensor * 4
  assert report["loss_logits_bytes_per_device"] == micro_rows // shards * 2048 * per_row
  assert report["unchunked_logits_bytes_per_device"] == micro_rows // shards * seq_len * per_row
  ideal = report["total_params"] * 4 / devices
  assert ideal <= report["params_bytes_per_device"] < 1.05 * ideal
  assert "is not on this machine" in out and "loss logits" in out and "YaRN factor 40" in out


def test_tiny_long_context_dry_run(capsys):
  gin.clear_config()
  try:
    report = entry.main(["--gin_file=gin_configs/experiments/tiny_long_context.gin", "--dry_run",
                         "--gin.pretrain.dry_run_devices=1"])
  finally:
    gin.clear_config()
  assert report["rope_scaling"] == YarnConfig(factor=4.0, original_max_position_embeddings=256)
  assert report["max_position_embeddings"] == 1024


@pytest.mark.slow
def test_tiny_long_context_trains_from_a_pretraining_run(tmp_path):
  """tiny_long_context.gin as shipped, from a small pretraining run instead of runs/tiny_pretrain
  and on synthetic rows instead of the corpus (the data path is the pretraining one)."""
  gin.clear_config()
  gin.bind_parameter("model_config.max_position_embeddings", 256)
  try:
    _train(tmp_path / "pre", 1, 256)
  finally:
    gin.clear_config()
  try:
    res = entry.main(["--gin_file=gin_configs/experiments/tiny_long_context.gin",
                      f"--gin.MODEL_DIR='{tmp_path / 'long'}'",
                      f"--gin.INIT_FROM_CHECKPOINT='{tmp_path / 'pre'}'",
                      "--gin.pretrain.data=@SyntheticData()", "--gin.TRAIN_STEPS=1",
                      "--gin.BATCH_SIZE=8", "--gin.pretrain.async_checkpoints=False"])
  finally:
    gin.clear_config()
  assert res["step"] == 1 and np.isfinite(res["losses"][1])
  cfg = res["model_config"]
  assert cfg.rope_scaling.factor == 4.0 and cfg.max_position_embeddings == 1024
  assert cfg.vocab_size == TINY.vocab_size     # the architecture of the run it continues
