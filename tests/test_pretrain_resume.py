"""The pretraining command in subprocesses: resume after kill -9 (bit for bit), SIGTERM saves,
two processes over loopback equal one."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = os.path.dirname(os.__file__)
from run_metrics import read_metrics as _metrics

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
  if "CODER_JAX_NUM_PROCESSES" in extra:
    # Processes over gloo deadlock in their first cross-process collective when one of them
    # finds its programs in jax's persistent compilation cache (conftest.py turns it on) and the
    # other compiles: found here with jax 0.10.2 on CPU.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, sig):
  model_dir = tmp_path / "run"
  cmd = _cmd(model_dir, "--gin.DATA_DIR='unused'", "--gin.TRAIN_STEPS=100000",
             "--gin.pretrain.checkpoint_every=100000", "--gin.pretrain.data=@SyntheticData()")
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  _wait_for_step(str(model_dir), 3, proc)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  step = int(out.split(f"{sig.name}: saved checkpoint at step ")[1].split()[0])
  assert step >= 3
  assert os.path.isdir(model_dir / "checkpoints" / str(step) / "state")
  cmd[cmd.index("--gin.TRAIN_STEPS=100000")] = f"--gin.TRAIN_STEPS={step + 2}"
  out = subprocess.run(cmd, env=_env(), cwd=REPO, check=True, capture_output=True, text=True).stdout
  assert f"restored step {step}" in out and f"finished step {step + 2}" in out


@pytest.mark.parametrize("mesh, data_shards", [
    ("expert=2", 2),
    # The sequence split over 8 devices on both hosts: the batch is not split, so both hosts
    # feed the same rows (one data shard) and each device takes its part of the sequence.
    pytest.param("context=8", 1, marks=pytest.mark.slow)])
def test_two_processes_equal_one(tmp_path, mesh, data_shards):
  import json
  common = ("--gin.DATA_DIR='unused'", "--gin.TRAIN_STEPS=3", "--gin.pretrain.data=@SyntheticData()",
            f"--gin.mesh_config.{mesh}")
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
  # The checkpoint keeps one data position per data shard, in shard order.
  saved = json.load(open(tmp_path / "two" / "checkpoints" / "3" / "data" / "metadata"))
  assert len(saved["hosts"]) == data_shards
  assert [h["batches"] for h in saved["hosts"]] == [3] * data_shards


def test_tokenizer_larger_than_the_model_vocab_is_refused(data_dir):
  from coder_jax.train.data import CodeData
  with pytest.raises(ValueError, match=r"vocab_size: the tokenizer .* has \d+ tokens but the "
                                       r"model's vocab_size is 300"):
    CodeData(data_dir=data_dir).open(model_vocab=300, batch_rows=2, seq_len=32, shard=0,
                                     num_shards=1, start_batch=0)


def test_the_run_records_its_tokenizer_and_refuses_another_on_resume(tmp_path, data_dir):
  """MODEL_DIR/tokenizer.json is the data's tokenizer (decode, eval and export use it) and each
  checkpoint records its path and hash; resuming with data made by another tokenizer fails."""
  import gin
  import hashlib
  import json
  from coder_jax.data.prepare import prepare
  from coder_jax.parallel.mesh import MeshConfig
  from coder_jax.stages.pretrain import pretrain
  from coder_jax.train.data import CodeData
  from coder_jax.train.optim import OptimizerConfig

  def run(data, steps):
    gin.clear_config()
    gin.bind_parameter("model_config.vocab_size", 512)
    try:
      return pretrain(model_dir=str(tmp_path / "run"), train_steps=steps, batch_size=8,
                      seq_len=32, data=CodeData(data_dir=data), mesh_config=MeshConfig(),
                      compute_dtype="float32", checkpoint_every=1, async_checkpoints=False,
                      optimizer_config=OptimizerConfig(learning_rate=1e-3, warmup_steps=1))
    finally:
      gin.clear_config()

  run(data_dir, 1)
  own = tmp_path / "run" / "tokenizer.json"
  data_tok = os.path.join(data_dir, "tokenizer.json")
  assert open(own, "rb").read() == open(data_tok, "rb").read()
  record = json.load(open(tmp_path / "run" / "checkpoints" / "1" / "data" / "metadata"))
  assert record["tokenizer"] == {"path": data_tok,
                                 "sha256": hashlib.sha256(open(data_tok, "rb").read()).hexdigest()}
  src = tmp_path / "src"
  shutil.copytree(os.path.join(STDLIB, "email"), src / "email")
  other = str(tmp_path / "other")
  prepare(other, [str(src)], vocab_size=300, validation_fraction=0.2)
  with pytest.raises(ValueError, match=r"tokenizer: .*run was trained with .*tokenizer.json, "
                                       r"but the data now uses .*a different tokenizer"):
    run(other, 2)
  assert open(own, "rb").read() == open(data_tok, "rb").read()   # left as it was
