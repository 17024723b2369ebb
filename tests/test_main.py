"""The gin entry point runs the demo stage; bad flags fail with a clear message."""

import gin
import pytest

from coder_jax import main as entry


def test_demo_run_config(capsys):
  gin.clear_config()
  result = entry.main(["--gin_file=gin_configs/runs/demo.gin", "--gin.model_demo.seq_len=16"])
  out = capsys.readouterr().out
  assert result["logits_shape"] == (2, 16, 512)
  assert result["packed_diff"] < 1e-5
  assert abs(result["loss"] - 6.238) < 0.2  # ~ln(512) for an untrained model
  assert "total parameters" in out and "packed vs alone" in out
  gin.clear_config()


def test_flags_are_checked(capsys):
  with pytest.raises(SystemExit):
    entry.main(["--gin_file=gin_configs/runs/demo.gin", "--model=tiny"])
  assert "--gin.NAME=VALUE" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    entry.main([])
  assert "at least one --gin_file" in capsys.readouterr().err


def test_model_side_never_imports_tensorflow():
  import subprocess
  import sys
  code = ("import sys, coder_jax.model, coder_jax.hf, coder_jax.main, coder_jax.model.info, "
          "pallas_kernels, coder_jax.data.fim, coder_jax.data.corpus, coder_jax.stages.pretrain, "
          "coder_jax.train.step, coder_jax.train.checkpoint, coder_jax.parallel.expert; "
          "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets', 'torch') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


TINY = ["--gin_file=gin_configs/experiments/tiny_pretrain.gin", "--dry_run"]


@pytest.mark.parametrize("flags, message", [
    (["--gin_file=nosuch.gin"], r"FileNotFoundError: --gin_file: nosuch.gin: no such file"),
    (["--gin.TRAIN_STEPS='abc'"],
     r"pretrain.train_steps = 'abc' \(set through macro TRAIN_STEPS\): expected int, got str"),
    (["--gin.BATCH_SIZE=8.5"], r"pretrain.batch_size = 8.5 .*expected int, got float"),
    (["--gin.CodeData.fim_rate='high'"], r"CodeData.fim_rate = 'high': expected float"),
    (["--gin.model_config.num_hidden_layers='x'"], r"model_config.num_hidden_layers = 'x'"),
    (["--gin.TRAIN_STEP=5"], r"macro TRAIN_STEP is bound but nothing reads it"),
    (["--gin.pretrain.train_step=5"], r"'pretrain' doesn't have a parameter named 'train_step'"),
    (["--gin.nosuch.x=5"], r"No configurable matching 'nosuch'"),
    (["--gin_file=BAD_GIN"], r"gin: syntax error"),
])
def test_gin_mistakes_are_one_line_with_exit_2(flags, message, tmp_path, capsys):
  bad = tmp_path / "bad.gin"
  bad.write_text("pretrain.seed = (1,\n")
  flags = [f.replace("BAD_GIN", str(bad)) for f in flags]
  gin.clear_config()
  assert entry.run(TINY + flags) == 2
  err = capsys.readouterr().err
  gin.clear_config()
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert __import__("re").search(message, lines[0]), lines[0]


def test_every_shipped_gin_file_reads_each_macro_it_binds(capsys):
  """The unread-macro check must not reject the project's own configs."""
  import glob
  for f in sorted(glob.glob("gin_configs/experiments/*.gin")):
    gin.clear_config()
    from coder_jax.gin_flags import parse
    from coder_jax.stages import register_all
    register_all()
    try:
      parse([f], [], ["."])
    except ValueError as e:
      assert "REQUIRED" in str(e), (f, e)   # a macro the user must still set
  gin.clear_config()


@pytest.mark.parametrize("kind", ["file", "read_only"])
def test_model_dir_that_cannot_be_written_is_one_line(kind, tmp_path, capsys):
  import subprocess
  target = tmp_path / "model_dir"
  if kind == "file":
    target.write_text("not a directory")
    expect = f"MODEL_DIR: {target} exists and is not a directory"
  else:
    # Root ignores permission bits: a read-only bind mount is what refuses writes here.
    target.mkdir()
    ro = subprocess.run(["mount", "--bind", "-o", "ro", str(target), str(target)],
                        capture_output=True)
    if ro.returncode:
      pytest.skip(f"cannot make a read-only bind mount here: {ro.stderr!r}")
    expect = f"MODEL_DIR: cannot write to {target} (Read-only file system)"
  try:
    gin.clear_config()
    assert entry.run(["--gin_file=gin_configs/experiments/tiny_pretrain.gin",
                      f"--gin.MODEL_DIR='{target}'", "--gin.pretrain.data=@SyntheticData()",
                      "--gin.TRAIN_STEPS=1"]) == 2
    assert expect in capsys.readouterr().err
  finally:
    gin.clear_config()
    if kind == "read_only":
      subprocess.run(["umount", str(target)], check=True)
  assert (target.read_text() == "not a directory") if kind == "file" else not any(target.iterdir())


@pytest.mark.parametrize("name, devices, flags, params_gib", [
    ("coder_v2_lite_sft", 8, ["HF_CHECKPOINT", "SFT_DATA", "TOKENIZER"], 7.31),
    ("coder_v2_sft", 256, ["HF_CHECKPOINT", "SFT_DATA", "TOKENIZER"], 3.43),
    ("coder_v2_lite_grpo", 8, ["POLICY", "REWARD_MODEL", "TOKENIZER"], 7.31),
    ("coder_v2_grpo", 256, ["POLICY", "REWARD_MODEL", "TOKENIZER"], 3.43),
])
def test_post_training_experiments_dry_run_on_their_meshes(name, devices, flags, params_gib,
                                                            capsys):
  stage = "grpo" if "grpo" in name else "sft"
  gin.clear_config()
  report = entry.main([f"--gin_file=gin_configs/experiments/{name}.gin", "--dry_run",
                       "--gin.MODEL_DIR='/tmp/unused'", f"--gin.{stage}.dry_run_devices={devices}"]
                      + [f"--gin.{f}='/not/here/{f.lower()}'" for f in flags])
  gin.clear_config()
  assert report["num_devices"] == devices
  assert round(report["params_bytes_per_device"] / 2**30, 2) == params_gib
  assert "is not on this machine" in capsys.readouterr().out
