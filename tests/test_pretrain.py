"""The pretraining stage end to end: resume after kill -9 (bit for bit), SIGTERM, restoring onto
another mesh, the non-finite guard, two processes vs one, dry runs of the big presets, errors
before compiling, metrics files and export of a training checkpoint."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(os.__file__)
TINY = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/pretrain.gin"]


def _cmd(model_dir, *extra):
  return [sys.executable, "-m", "coder_jax.main", *TINY, f"--gin.MODEL_DIR='{model_dir}'",
          "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.pretrain.compute_dtype='float32'",
          "--gin.model_config.moe_impl='tiled'", "--gin.WARMUP_STEPS=2",
          "--gin.LEARNING_RATE=3e-3", *extra]


def _env(devices=8, **extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update(extra)
  return env


def _metrics(model_dir):
  """step -> last logged record (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  path = os.path.join(model_dir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      if line.strip():
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by kill -9
        out[rec["step"]] = rec
  return out


def _wait_for_step(model_dir, step, proc, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(_metrics(model_dir), default=0) >= step:
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.1)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from coder_jax.data.prepare import prepare
  root = tmp_path_factory.mktemp("pretrain_data")
  src = root / "src"
  shutil.copytree(os.path.join(STDLIB, "json"), src / "json")
  for name in ("heapq.py", "bisect.py", "textwrap.py"):
    shutil.copy(os.path.join(STDLIB, name), src / name)
  prepare(str(root / "data"), [str(src)], vocab_size=512, validation_fraction=0.2)
  return str(root / "data")


def test_resume_after_kill9_is_bit_exact(tmp_path, data_dir):
  """20 steps straight vs killed with SIGKILL around step 10 and restarted: every step from the
  restart on has the same loss bit for bit (real code data, expert parallelism over 2 devices)."""
  common = (f"--gin.DATA_DIR='{data_dir}'", "--gin.TRAIN_STEPS=20",
            "--gin.pretrain.checkpoint_every=4", "--gin.mesh_config.expert=2")
  straight = tmp_path / "straight"
  subprocess.run(_cmd(straight, *common), env=_env(), check=True, capture_output=True, cwd=REPO)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed, *common), env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_step(str(killed), 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = _metrics(str(killed))
  assert 10 <= max(before) < 20
  out = subprocess.run(_cmd(killed, *common), env=_env(), check=True, capture_output=True,
                       text=True, cwd=REPO)
  restored = int(out.stdout.split("restored step ")[1].split()[0])
  assert restored % 4 == 0 and restored <= max(before)
  a, b = _metrics(str(straight)), _metrics(str(killed))
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  for s in range(restored + 1, 21):
    assert b[s]["loss"] == a[s]["loss"], (s, a[s]["loss"], b[s]["loss"])
    assert b[s]["grad_norm"] == a[s]["grad_norm"]
  assert a[20]["loss"] < a[1]["loss"] - 0.3  # it learns
  assert os.listdir(straight / "tensorboard")


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
  model_dir = tmp_path / "run"
  cmd = _cmd(model_dir, "--gin.DATA_DIR='unused'", "--gin.TRAIN_STEPS=100000",
             "--gin.pretrain.checkpoint_every=100000", "--gin.pretrain.data=@SyntheticData()")
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  _wait_for_step(str(model_dir), 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  step = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0])
  assert step >= 3
  assert os.path.exists(model_dir / "checkpoints" / str(step) / "commit_success.txt") or \
      os.path.isdir(model_dir / "checkpoints" / str(step) / "state")


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


def test_two_processes_equal_one(tmp_path):
  common = ("--gin.DATA_DIR='unused'", "--gin.TRAIN_STEPS=3", "--gin.pretrain.data=@SyntheticData()",
            "--gin.mesh_config.expert=2")
  procs = [subprocess.Popen(_cmd(tmp_path / "two", *common), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(4, CODER_JAX_COORDINATOR="127.0.0.1:%d" % (20000 + os.getpid() % 20000),
                                     CODER_JAX_NUM_PROCESSES="2", CODER_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  subprocess.run(_cmd(tmp_path / "one", *common), env=_env(8), check=True, capture_output=True,
                 cwd=REPO)
  two, one = _metrics(str(tmp_path / "two")), _metrics(str(tmp_path / "one"))
  assert sorted(two) == sorted(one) == [1, 2, 3]
  for s in one:
    np.testing.assert_allclose(two[s]["loss"], one[s]["loss"], rtol=1e-5)
    np.testing.assert_allclose(two[s]["grad_norm"], one[s]["grad_norm"], rtol=1e-5)


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
      "data": 1, "fsdp": 32, "expert": 8, "tensor": 1}
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
