"""`python -m coder_jax.hf`, run in-process: export -> import -> export keeps every bit."""

import json
import os

import jax
import numpy as np
from flax import nnx

from coder_jax import hf
from coder_jax.hf.__main__ import main
from coder_jax.model.checkpoint import CONFIG_NAME
from coder_jax.model.config import get_config
from coder_jax.model.decoder import init_model


def _params(m):
  return jax.tree.leaves(nnx.state(m, nnx.Param))


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert len(pa) == len(pb)
  for x, y in zip(pa, pb):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def _config(d):
  with open(os.path.join(d, "config.json")) as fh:
    return json.load(fh)


def test_export_import_export_roundtrip(tmp_path, capsys):
  a, b, c = (str(tmp_path / n) for n in "ABC")
  assert main(["export", "--preset", "tiny", "--seed", "0", "--out", a]) == 0
  assert main(["import", "--hf_dir", a, "--out", b]) == 0
  assert os.path.exists(os.path.join(b, CONFIG_NAME))
  assert main(["export", "--checkpoint", b, "--out", c]) == 0
  out = capsys.readouterr()
  assert "error:" not in out.err
  assert f"saved {a}" in out.out and f"saved {c}" in out.out
  assert _config(a) == _config(c)
  ma, mc = hf.load(a), hf.load(c)
  _assert_same_params(ma, init_model(get_config("tiny"), seed=0))   # --seed is honoured
  _assert_same_params(mc, ma)
  ids = np.random.default_rng(0).integers(0, ma.cfg.vocab_size, (2, 8))
  la, lc = np.asarray(ma(ids)), np.asarray(mc(ids))
  assert la.shape == (2, 8, ma.cfg.vocab_size) and np.isfinite(la).all()
  assert np.array_equal(la, lc)


def test_errors_return_2_and_print_error(tmp_path, capsys):
  missing, out = str(tmp_path / "nope"), str(tmp_path / "out")
  assert main(["import", "--hf_dir", missing, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and missing in err
  assert not os.path.exists(out)

  llama = tmp_path / "llama"
  llama.mkdir()
  (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
  assert main(["import", "--hf_dir", str(llama), "--out", out]) == 2
  assert "error: model_type" in capsys.readouterr().err
  assert not os.path.exists(out)

  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("keep")
  assert main(["export", "--preset", "tiny", "--out", str(existing)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "exists" in err
  assert os.listdir(existing) == ["keep.txt"]

  assert main(["export", "--preset", "tiny", "--out", out, "--max_shard_size", "abc"]) == 2
  assert "max_shard_size" in capsys.readouterr().err
  assert not os.path.exists(out)

  assert main(["export", "--preset", "tiny", "--out", str(existing), "--overwrite"]) == 0
  assert sorted(os.listdir(existing)) == ["config.json", "model.safetensors"]
