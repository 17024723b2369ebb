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
