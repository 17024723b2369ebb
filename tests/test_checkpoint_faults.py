"""Fault injection on training checkpoints: a damaged newest step (a missing file, a truncated
file, garbage, an empty step directory) is named in one line, kept, and the run resumes from the
previous intact step with the losses of a run that stopped there; when no step restores, one
line says so and nothing is moved. Export/decode loading skips damaged steps the same way."""

import glob
import os
import shutil

import gin
import numpy as np
import pytest

from coder_jax.model.config import ConfigError
from coder_jax.parallel.mesh import MeshConfig
from coder_jax.stages.pretrain import pretrain
from coder_jax.train.checkpoint import CheckpointDamagedError, load_params
from coder_jax.train.data import SyntheticData
from coder_jax.train.optim import OptimizerConfig
from file_tree import tree
from run_metrics import read_metrics

STEPS = 4   # checkpoints at 2 and 4; every resumed run ends at the same step (same schedule)


def _pretrain(model_dir, steps=STEPS, **kw):
  gin.clear_config()
  for key, value in kw.pop("gin", {}).items():
    gin.bind_parameter(key, value)
  return pretrain(model_dir=str(model_dir), train_steps=steps, batch_size=8, seq_len=32,
                  data=SyntheticData(), mesh_config=MeshConfig(), compute_dtype="float32",
                  checkpoint_every=2, async_checkpoints=False,
                  optimizer_config=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), **kw)


def _biggest_state_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _damage(step_dir, how):
  if how == "empty_dir":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return
  big = _biggest_state_file(step_dir)
  if how == "missing_file":
    os.remove(big)
  elif how == "truncated_file":
    os.truncate(big, os.path.getsize(big) // 2)
  elif how == "garbage":
    data = np.random.default_rng(0).integers(0, 256, os.path.getsize(big), np.uint8).tobytes()
    open(big, "wb").write(data)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A finished run (checkpoints 2 and 4) and the losses of the same run resumed from step 2."""
  root = tmp_path_factory.mktemp("ckpt_faults")
  _pretrain(root / "base")
  ref = root / "reference"
  shutil.copytree(root / "base", ref)
  shutil.rmtree(ref / "checkpoints" / str(STEPS))   # the run that stopped at step 2
  resumed = _pretrain(ref)
  assert sorted(resumed["losses"]) == [3, 4]
  return root / "base", resumed["losses"]


@pytest.mark.parametrize("how", ["missing_file", "truncated_file", "garbage", "empty_dir"])
def test_damaged_newest_step_resumes_from_the_previous_one(base, tmp_path, capsys, how):
  base_dir, want = base
  run = tmp_path / "run"
  shutil.copytree(base_dir, run)
  _damage(run / "checkpoints" / "4", how)
  damaged = tree(run / "checkpoints" / "4")
  capsys.readouterr()
  res = _pretrain(run)
  out = capsys.readouterr()
  assert res["losses"] == want   # bit for bit: the same steps from the same state
  lines = [l for l in out.err.splitlines() if "damaged" in l]
  assert len(lines) == 2, out.err    # one line naming the step, one saying where it was kept
  assert "checkpoint step 4" in lines[0] and "is damaged (" in lines[0]
  assert "\n" not in lines[0] and "Traceback" not in out.err
  assert "restored step 2" in out.out
  # Kept, byte for byte, beside the checkpoints; the run then saved its own step 4.
  assert tree(run / "checkpoints_damaged" / "4") == damaged
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  # One metrics row per step, the replayed ones replacing the rows of the damaged run.
  m = read_metrics(run)
  assert sorted(m) == [1, 2, 3, 4]
  lines = open(run / "metrics.jsonl").read().splitlines()
  assert len(lines) == 4
  assert m[4]["loss"] == want[4]


def test_no_step_restores_is_one_error_and_nothing_moves(base, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(base[0], run)
  _damage(run / "checkpoints" / "4", "missing_file")
  _damage(run / "checkpoints" / "2", "empty_dir")
  before = tree(run)
  with pytest.raises(CheckpointDamagedError, match=r"no checkpoint restores \(damaged steps: "
                                                   r"4, 2\); move them away") as e:
    _pretrain(run)
  from coder_jax.cli import one_line
  assert one_line(e.value).startswith(f"{run}/checkpoints: no checkpoint restores")
  after = tree(run)
  assert {k: v for k, v in after.items() if not k.startswith("tensorboard")} == \
      {k: v for k, v in before.items() if not k.startswith("tensorboard")}


def test_loading_for_export_and_decode_skips_damaged_steps(base, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(base[0], run)
  intact, step = load_params(str(run), 2)
  for f in glob.glob(str(run / "checkpoints" / "4" / "state" / "**" / "d" / "*"), recursive=True):
    os.truncate(f, os.path.getsize(f) // 2)   # parameters and optimizer state alike
  before = tree(run)
  model, step = load_params(str(run))
  assert step == 2
  assert "checkpoint step 4" in capsys.readouterr().err
  import jax
  from flax import nnx
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(intact, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CheckpointDamagedError, match=r"checkpoint step 4 is damaged \("):
    load_params(str(run), 4)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 \(steps: \[2, 4\]\)"):
    load_params(str(run), 7)
  assert tree(run) == before   # reading never moves or deletes anything


def test_resume_with_a_changed_computation_field_names_it(base, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(base[0], run)
  with pytest.raises(ConfigError, match=r"another model config \(rope_theta: 10000.0 -> 5000.0\)"):
    _pretrain(run, STEPS + 1, gin={"model_config.rope_theta": 5000.0})
  # A runtime field (how the same function is computed) may change.
  res = _pretrain(run, STEPS + 1, gin={"model_config.remat_policy": "full"})
  assert sorted(res["losses"]) == [5]


def test_export_from_damaged_or_relative_paths_is_one_line(base, tmp_path, capsys, monkeypatch):
  """`hf export` of a run whose every step is damaged is one line and exit 2; a relative
  --checkpoint path works (Orbax wants absolute ones)."""
  from coder_jax.hf.__main__ import main as hf_main
  from coder_jax.model.checkpoint import save_model
  run = tmp_path / "run"
  shutil.copytree(base[0], run)
  for step in ("2", "4"):
    _damage(run / "checkpoints" / step, "empty_dir")
  capsys.readouterr()
  assert hf_main(["export", "--train_dir", str(run), "--out", str(tmp_path / "hf")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith("error: ") and "no checkpoint restores (damaged steps: 4, 2)" in lines[-1]
  assert [l.split(" in ")[0] for l in lines[:-1]] == ["checkpoint step 4", "checkpoint step 2"]
  assert not os.path.exists(tmp_path / "hf")
  model, _ = load_params(str(base[0]), 2)
  save_model(model, str(tmp_path / "native"))
  monkeypatch.chdir(tmp_path)
  assert hf_main(["export", "--checkpoint", "native", "--out", "hf_rel"]) == 0
  assert os.path.exists(tmp_path / "hf_rel" / "config.json")
