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
from file_tree import tree


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
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "model_type" in err, err
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

  # --overwrite replaces an earlier export only: a directory holding a user's file is kept.
  assert main(["export", "--preset", "tiny", "--out", str(existing), "--overwrite"]) == 2
  assert "keep.txt" in capsys.readouterr().err
  assert os.listdir(existing) == ["keep.txt"] and (existing / "keep.txt").read_text() == "keep"


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
  export = str(tmp_path / "export")
  assert main(["export", "--preset", "tiny", "--seed", "1", "--out", export]) == 0
  ck = str(tmp_path / "parent" / "ck")   # a native checkpoint, the source of an export below
  assert main(["import", "--hf_dir", export, "--out", ck]) == 0
  user = tmp_path / "user"
  user.mkdir()
  (user / "config.json").write_text("{}")
  (user / "notes.md").write_text("mine")
  nested = tmp_path / "nested"
  (nested / "sub").mkdir(parents=True)
  afile = tmp_path / "afile"
  afile.write_text("a file, not a directory")
  capsys.readouterr()
  refused = {  # --out -> what the one-line error names
      str(user): "notes.md", str(nested): "sub", str(afile): "not a directory",
      ck: "source", str(tmp_path / "parent"): "source", os.path.join(ck, "params"): "source"}
  for out, named in refused.items():
    before = tree(tmp_path)
    assert main(["export", "--checkpoint", ck, "--out", out, "--overwrite"]) == 2, out
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, (out, err)
    assert tree(tmp_path) == before, out   # nothing changed, nothing left behind
  # An earlier export (with the files an export writes) and an empty directory are replaced.
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    (tmp_path / "export" / name).write_text("{}")
  (tmp_path / "empty").mkdir()
  for out in (export, str(tmp_path / "empty")):
    assert main(["export", "--preset", "tiny", "--seed", "0", "--out", out, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _assert_same_params(hf.load(out), init_model(get_config("tiny"), seed=0))
  assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "export", "nested", "parent", "user"]
