"""The pretraining stage in process: restoring onto another mesh, the non-finite guard, dry runs
of the big presets, errors before compiling, metrics files, continued pretraining from a Hugging
Face checkpoint and export of a training checkpoint. (Runs in subprocesses: test_pretrain_resume.)"""

import os
import shutil
import time

import gin
import jax
import numpy as np
import pytest

from coder_jax import main as entry
from coder_jax.parallel.mesh import MeshConfig
from coder_jax.stages.pretrain import NonFiniteLossError, pretrain
from coder_jax.train.data import SyntheticData
from coder_jax.train.optim import OptimizerConfig
from run_metrics import read_metrics as _metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(os.__file__)
TINY = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin"]


def _pretrain(model_dir, steps, mesh=MeshConfig(), **kw):
  gin.clear_config()
  kw.setdefault("optimizer_config", OptimizerConfig(learning_rate=3e-3, warmup_steps=2))
  return pretrain(model_dir=str(model_dir), train_steps=steps, batch_size=8, seq_len=32,
                  data=SyntheticData(), mesh_config=mesh, compute_dtype="float32",
                  checkpoint_every=3, async_checkpoints=False, **kw)


def test_restore_onto_another_mesh_gives_the_same_next_loss(tmp_path):
  first = _pretrain(tmp_path / "a", 3, MeshConfig(fsdp=8))
  assert first["last_checkpoint"] == 3
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  same = _pretrain(tmp_path / "a", 4, MeshConfig(fsdp=8))
  other = _pretrain(tmp_path / "b", 4, MeshConfig(data=2, expert=2, tensor=2, fsdp=1))
  assert set(same["losses"]) == set(other["losses"]) == {4}
  np.testing.assert_allclose(other["losses"][4], same["losses"][4], rtol=1e-5)
  rec = _metrics(str(tmp_path / "b"))[4]
  for key in ("loss", "ce_loss", "expert_balance", "grad_norm", "learning_rate", "tokens_per_s",
              "step_time_s", "expert_load", "expert_load_max", "nonfinite_total"):
    assert key in rec, key
  assert len(rec["expert_load"]) == 2 and abs(sum(rec["expert_load"][0]) - 1) < 1e-3


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
  res = _pretrain(tmp_path / "one", 5, nan_injection_steps=(4,))
  m = _metrics(str(tmp_path / "one"))
  assert m[4]["skipped"] == 1 and m[4]["loss"] == "nan" and m[5]["skipped"] == 0
  assert m[5]["nonfinite_total"] == 1 and res["step"] == 5
  # A skipped update does not advance the learning-rate schedule.
  assert m[5]["learning_rate"] == m[4]["learning_rate"] != m[3]["learning_rate"]
  with pytest.raises(NonFiniteLossError, match=r"3 consecutive .* last good checkpoint is step 3"):
    _pretrain(tmp_path / "many", 10, nan_injection_steps=(4, 5, 6, 7),
              max_consecutive_nonfinite=3)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "many" / "checkpoints") if s.isdigit())
  assert steps == [3]
  # A forced save (stop_after, SIGTERM, the last step) still happens inside a streak.
  res = _pretrain(tmp_path / "stop", 10, nan_injection_steps=(2,), stop_after=2)
  assert res["reason"] == "stop_after" and res["last_checkpoint"] == 2



def _dry_run(capsys, *args):
  gin.clear_config()
  try:
    report = entry.main([*args, "--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'",
                         "--dry_run"])
  finally:
    gin.clear_config()
  return report, capsys.readouterr().out


def test_dry_run_236b_on_256_devices(capsys):
  report, out = _dry_run(capsys, "--gin_file=gin_configs/experiments/coder_v2_pretrain.gin",
                         "--gin.pretrain.dry_run_devices=256")
  assert report["num_devices"] == 256 and report["mesh"] == {
      "data": 1, "fsdp": 32, "context": 1, "expert": 8, "tensor": 1}
  assert abs(report["total_params"] / 1e9 - 235.74) < 0.01
  ideal = report["total_params"] * 4 / 256    # float32 master weights spread evenly
  assert ideal <= report["params_bytes_per_device"] < 1.02 * ideal
  assert abs(report["opt_state_bytes_per_device"] / report["params_bytes_per_device"] - 2) < 0.01
  assert "per device" in out and "GiB" in out and "fsdp=32" in out


def test_dry_run_lite_on_8_devices(capsys):
  report, out = _dry_run(capsys, "--gin_file=gin_configs/experiments/coder_v2_lite_pretrain.gin")
  assert report["num_devices"] == 8 and report["mesh"]["expert"] == 8
  assert abs(report["total_params"] / 1e9 - 15.71) < 0.01
  assert abs(report["active_params"] / 1e9 - 2.45) < 0.02
  ideal = report["total_params"] * 4 / 8
  assert ideal <= report["params_bytes_per_device"] < 1.05 * ideal
  assert "15.71B parameters" in out


@pytest.mark.parametrize("bindings,message", [
    (["--gin.mesh_config.expert=4", "--gin.model_config.n_routed_experts=6",
      "--gin.model_config.num_experts_per_tok=2"], "n_routed_experts=6 is not divisible by the expert axis (4)"),
    (["--gin.mesh_config.tensor=8", "--gin.mesh_config.fsdp=1"], "num_attention_heads=4 is not divisible by the tensor axis (8)"),
    (["--gin.BATCH_SIZE=4"], "batch_size=4 (micro-batch 4 with grad_accum_steps=1) is not divisible by data x fsdp x expert = 1 x 8 x 1 = 8"),
    (["--gin.mesh_config.expert=3"], "8 devices are not divisible by the fixed axes"),
    (["--gin.pretrain.grad_accum_steps=3"], "batch_size=8 is not divisible by grad_accum_steps=3"),
    (["--gin.balance_loss.comm_alpha=0.02"], "device_alpha / comm_alpha are set but model_config.routing_devices is 1"),
])
def test_config_errors_are_reported_before_compiling(tmp_path, capsys, bindings, message):
  gin.clear_config()
  t0 = time.time()
  code = entry.run([*TINY, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.DATA_DIR='x'",
                    "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
                    "--gin.pretrain.data=@SyntheticData()", *bindings])
  gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2 and message in err, err
  assert not os.path.exists(tmp_path / "checkpoints")
  assert time.time() - t0 < 30


def test_export_training_checkpoint_to_hf(tmp_path):
  from coder_jax import hf
  from coder_jax.hf.__main__ import main as hf_main
  from coder_jax.train.checkpoint import load_params
  _pretrain(tmp_path / "run", 3)
  assert hf_main(["export", "--train_dir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
  trained, step = load_params(str(tmp_path / "run"))
  assert step == 3
  back = hf.load(str(tmp_path / "hf"))
  ids = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(trained(ids)))
  assert hf_main(["export", "--train_dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_continued_pretraining_from_hf(tmp_path):
  """init_from_hf: the architecture comes from config.json, the first step's loss is the HF
  model's loss on the first batch."""
  from flax import nnx
  from coder_jax import hf
  from coder_jax.model.config import get_config
  from coder_jax.model.decoder import init_model
  from coder_jax.train.step import loss_and_grads
  src = init_model(get_config("tiny", num_hidden_layers=2, first_k_dense_replace=1), seed=7)
  hf.save(src, str(tmp_path / "hf"))
  res = _pretrain(tmp_path / "run", 1, init_from_hf=str(tmp_path / "hf"))
  assert res["model_config"].num_hidden_layers == 2
  batch = next(SyntheticData().open(model_vocab=512, batch_rows=8, seq_len=32, shard=0,
                                    num_shards=1, start_batch=0))
  loss, _ = jax.jit(lambda p, b: loss_and_grads(nnx.graphdef(src), src.cfg, p, b))(
      nnx.to_pure_dict(nnx.state(src, nnx.Param)), batch)
  np.testing.assert_allclose(res["losses"][1], float(loss), rtol=1e-5)


def test_bad_run_arguments(tmp_path):
  with pytest.raises(ValueError, match="train_steps and checkpoint_every must be >= 1"):
    _pretrain(tmp_path / "x", 0)


def test_distributed_environment_must_be_complete():
  from coder_jax.parallel.distributed import initialize_from_env
  with pytest.raises(ValueError, match="CODER_JAX_COORDINATOR set but CODER_JAX_NUM_PROCESSES, "
                                       "CODER_JAX_PROCESS_ID missing"):
    initialize_from_env({"CODER_JAX_COORDINATOR": "127.0.0.1:1234"})
  assert initialize_from_env({}) is False


class _OnHosts:
  """A sharding whose devices (ids 0-7) live on hosts id // per_host (stand-in devices)."""

  def __init__(self, sharding, per_host):
    self.sharding, self.per_host = sharding, per_host

  def devices_indices_map(self, shape):
    host = lambda d: type("Device", (), {"process_index": d.id // self.per_host})()
    return {host(d): i for d, i in self.sharding.devices_indices_map(shape).items()}


@pytest.mark.parametrize("mesh_cfg, per_host, want", [
    (MeshConfig(fsdp=8), 4, [(0, 2, 0), (1, 2, 4)]),          # rows split over the hosts
    (MeshConfig(fsdp=2, context=4), 2, [(0, 2, 0), (0, 2, 0), (1, 2, 4), (1, 2, 4)]),
    (MeshConfig(context=8, fsdp=1), 4, [(0, 1, 0), (0, 1, 0)]),   # sequence over the hosts
    (MeshConfig(fsdp=4, tensor=2), 1, [(i // 2, 4, 2 * (i // 2)) for i in range(8)]),
])
def test_host_rows_follow_the_mesh(monkeypatch, mesh_cfg, per_host, want):
  """Which block of the batch's rows each host feeds: the hosts holding the same rows feed the
  same shard (two real processes: test_pretrain_resume.test_two_processes_equal_one)."""
  from jax.sharding import NamedSharding
  from coder_jax.parallel.distributed import host_rows
  from coder_jax.parallel.mesh import make_mesh
  from coder_jax.parallel.rules import logical_to_spec
  from coder_jax.train.step import TOKEN_AXES
  mesh = make_mesh(mesh_cfg)
  shape = (8, 16)
  sharding = NamedSharding(mesh, logical_to_spec(TOKEN_AXES, shape, mesh))
  got = []
  for host in range(8 // per_host):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    got.append(host_rows(_OnHosts(sharding, per_host), shape))
  assert got == want


def test_host_rows_refuses_interleaved_rows():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from coder_jax.parallel.distributed import host_rows
  from coder_jax.parallel.mesh import make_mesh
  mesh = make_mesh(MeshConfig(fsdp=8))
  sharding = NamedSharding(mesh, P("fsdp"))
  odd_even = type("S", (), {"devices_indices_map": lambda self, shape: {
      type("Device", (), {"process_index": d.id % 2})(): i
      for d, i in sharding.devices_indices_map(shape).items()}})()
  with pytest.raises(ValueError, match="not equal contiguous blocks"):
    host_rows(odd_even, (8, 4))


def test_dry_run_needs_a_stage_that_has_one(capsys):
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="--dry_run: stage 'model_demo' has no dry run"):
      entry.main(["--gin_file=gin_configs/runs/demo.gin", "--dry_run"])
  finally:
    gin.clear_config()
