"""coder_jax.hf failure modes: broken checkpoints and unsupported configs fail with an error that
names the tensor or field; save is atomic, shards stay bounded, bfloat16 keeps the router float32."""

import json
import os
import re
import shutil
import struct
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from coder_jax import hf
from coder_jax.hf import CheckpointError
from coder_jax.hf.config import config_from_hf, config_to_hf
from coder_jax.hf.names import tensor_specs
from coder_jax.hf.safetensors_io import SafetensorsFile, write_file
from coder_jax.model.config import ConfigError, YarnConfig, get_config
from coder_jax.model.decoder import init_model

ST = "model.safetensors"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def model():
  return init_model(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
  return hf.save(model, str(tmp_path_factory.mktemp("src") / "ck"))


@pytest.fixture
def ck(saved, tmp_path):
  """A fresh copy of the saved tiny checkpoint, to break."""
  return shutil.copytree(saved, tmp_path / "ck")


def _params(m):
  return jax.tree.leaves(nnx.state(m, nnx.Param))


def _same_params(a, b):
  pa, pb = _params(a), _params(b)
  return len(pa) == len(pb) and all(x.dtype == y.dtype and np.array_equal(x, y)
                                    for x, y in zip(pa, pb))


def _rewrite(ck, edit):
  """Replace ck/model.safetensors by the tensors edit({name: array}) returns."""
  f = SafetensorsFile(str(ck / ST))
  tensors = edit({k: np.array(f[k]) for k in f.keys()})
  write_file(str(ck / ST), [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.get)


def _snapshot(d):
  return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_missing_tensor_is_named(ck):
  _rewrite(ck, lambda t: {k: v for k, v in t.items() if k != EXPERT})
  with pytest.raises(CheckpointError, match=re.escape(f"missing tensor '{EXPERT}'")):
    hf.load(str(ck))


def test_wrong_shape_names_tensor_and_both_shapes(ck):
  name = "model.layers.0.self_attn.q_proj.weight"
  want = list(SafetensorsFile(str(ck / ST)).shape(name))
  _rewrite(ck, lambda t: {**t, name: t[name][:-1]})
  got = [want[0] - 1, want[1]]
  with pytest.raises(CheckpointError,
                     match=re.escape(f"'{name}' has shape {got}, expected {want}")):
    hf.load(str(ck))


def test_unexpected_tensor_is_named_but_rotary_inv_freq_is_ignored(ck, model):
  inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
  _rewrite(ck, lambda t: {**t, inv: np.ones(4, np.float32)})
  assert _same_params(hf.load(str(ck)), model)
  extra = "model.layers.0.mlp.gate_proj.bias"
  _rewrite(ck, lambda t: {**t, extra: np.zeros(160, np.float32)})
  with pytest.raises(CheckpointError, match=re.escape(f"unexpected tensor '{extra}'")):
    hf.load(str(ck))


def test_non_deepseek_model_type(ck):
  d = json.loads((ck / "config.json").read_text())
  (ck / "config.json").write_text(json.dumps({**d, "model_type": "llama"}))
  assert issubclass(ConfigError, ValueError)
  with pytest.raises(ConfigError, match="model_type.*'llama'"):
    hf.load(str(ck))


def test_directory_problems(ck, tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    hf.load(str(tmp_path / "nope"))
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(ck / "config.json", bare / "config.json")
  with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
    hf.load(str(bare))
  (ck / "config.json").write_text('{"model_type": "deepseek_v2",')
  with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
    hf.load(str(ck))
  os.remove(ck / "config.json")
  with pytest.raises(CheckpointError, match=r"config\.json: missing"):
    hf.load(str(ck))


def _tiny_hf(**kw):
  return {**config_to_hf(get_config("tiny"), "float32"), **kw}


@pytest.mark.parametrize("kw, field", [
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.rope_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
])
def test_unsupported_config_value_names_field(kw, field):
  with pytest.raises(ConfigError, match="^" + re.escape(field + ":")):
    config_from_hf(_tiny_hf(**kw))


YARN = dict(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


def test_remote_code_dialect_matches_transformers5_dialect():
  base = {k: v for k, v in _tiny_hf().items() if k not in ("rope_parameters", "dtype")}
  remote = {**base, "rope_theta": 50000.0, "rope_scaling": {"type": "yarn", **YARN},
            "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
            "scoring_func": "softmax", "ep_size": 1, "q_lora_rank": None, "moe_layer_freq": 1,
            "architectures": ["DeepseekV2ForCausalLM"], "torch_dtype": "bfloat16",
            "pretraining_tp": 1, "transformers_version": "4.39.3"}
  t5 = {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, **YARN}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")    # neither dialect has a key worth a warning
    a, b = config_from_hf(remote), config_from_hf(t5)
  assert a == b
  assert a.rope_theta == 50000.0 and a.q_lora_rank is None
  assert a.rope_scaling == YarnConfig(40.0, 4096, 32.0, 1.0, 0.707, 0.707, truncate=True)
  with pytest.warns(UserWarning, match="frobnicate_level"):
    assert config_from_hf({**t5, "frobnicate_level": 3}) == b


CORRUPT = {  # data, header length -> corrupted file
    "truncated_data": lambda d, n: d[:-100], "truncated_header": lambda d, n: d[:8 + n // 2],
    "shorter_than_8": lambda d, n: d[:5], "empty": lambda d, n: b"",
    "garbage": lambda d, n: bytes(range(256)) * 16,
    "header_not_utf8": lambda d, n: d[:8] + b"\xff" * n + d[8 + n:]}


@pytest.mark.parametrize("how", sorted(CORRUPT))
def test_corrupt_safetensors_is_a_checkpoint_error(ck, how):
  data = (ck / ST).read_bytes()
  (ck / ST).write_bytes(CORRUPT[how](data, struct.unpack("<Q", data[:8])[0]))
  with pytest.raises(CheckpointError, match=re.escape(ST)):
    hf.load(str(ck))


@pytest.mark.parametrize("header", [b"[]", b'{"a": 1}', b'{"a": {"dtype": "F32", "shape": [2]}}'])
def test_malformed_header_structure_is_a_checkpoint_error(ck, header):
  (ck / ST).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
  with pytest.raises(CheckpointError, match=re.escape(ST)):
    hf.load(str(ck))


def test_invalid_index_json_is_a_checkpoint_error(ck):
  (ck / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
    hf.load(str(ck))


def test_negative_data_offsets_are_rejected(ck):
  data = (ck / ST).read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  header = json.loads(data[8:8 + n])
  header["model.norm.weight"]["data_offsets"] = [-256, 0]   # 64 float32
  blob = json.dumps(header).encode()
  (ck / ST).write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
  with pytest.raises(CheckpointError, match="model.norm.weight"):
    hf.load(str(ck))


def test_sharded_save_is_bounded_indexed_and_loads_identically(model, tmp_path):
  bound = 20_000
  out = hf.save(model, str(tmp_path / "sh"), max_shard_size="20KB")
  files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
  k = len(files)
  assert k > 1 and files == [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
  with open(os.path.join(out, hf.INDEX_NAME)) as fh:
    pairs = json.load(fh, object_pairs_hook=lambda p: p)   # keeps duplicate keys visible
  index = {k: dict(v) if isinstance(v, list) else v for k, v in pairs}
  names = [k for k, _ in dict(pairs)["weight_map"]]
  assert len(names) == len(set(names)), "a tensor is listed twice in weight_map"
  where, total = {}, 0
  for fn in files:
    f = SafetensorsFile(os.path.join(out, fn))
    sizes = [int(np.prod(f.shape(n))) * f.dtype(n).itemsize for n in f.keys()]
    assert sum(sizes) <= bound or (len(sizes) == 1 and sizes[0] > bound), (fn, sizes)
    for n in f.keys():
      assert n not in where, f"{n} in {where.get(n)} and {fn}"
      where[n] = fn
    total += sum(sizes)
  assert set(where) == {s.name for s in tensor_specs(model.cfg)}
  assert index["weight_map"] == where
  assert index["metadata"]["total_size"] == total
  assert _same_params(hf.load(out), model)
  missing = os.path.join(out, files[1])
  os.remove(missing)
  with pytest.raises(CheckpointError, match=re.escape(missing) + ".*missing"):
    hf.load(out)


def _fail_after_first_write(monkeypatch):
  from coder_jax.hf import write as hf_write
  real, calls = hf_write.write_file, []

  def flaky(*args, **kw):
    if calls:
      raise OSError("disk full (injected by the test)")
    return calls.append(1) or real(*args, **kw)

  monkeypatch.setattr(hf_write, "write_file", flaky)


def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch):
  _fail_after_first_write(monkeypatch)
  with pytest.raises(OSError, match="disk full"):
    hf.save(model, str(tmp_path / "new"), max_shard_size="20KB")
  assert os.listdir(tmp_path) == []


def test_overwrite_is_explicit_and_atomic(model, ck, tmp_path, monkeypatch):
  before = _snapshot(ck)
  with pytest.raises(FileExistsError, match="overwrite"):
    hf.save(model, str(ck))
  assert _snapshot(ck) == before
  _fail_after_first_write(monkeypatch)
  with pytest.raises(OSError, match="disk full"):
    hf.save(model, str(ck), max_shard_size="20KB", overwrite=True)
  assert os.listdir(tmp_path) == ["ck"] and _snapshot(ck) == before
  assert _same_params(hf.load(str(ck)), model)
  monkeypatch.undo()
  other = init_model(get_config("tiny"), seed=1)
  hf.save(other, str(ck), overwrite=True)
  assert os.listdir(tmp_path) == ["ck"]
  loaded = hf.load(str(ck))
  assert _same_params(loaded, other) and not _same_params(loaded, model)


def test_save_refuses_what_transformers_cannot_express(model, tmp_path):
  m = init_model(get_config("tiny", num_hidden_layers=4, moe_layer_freq=2), seed=0)
  with pytest.raises(ConfigError, match="^moe_layer_freq"):
    hf.save(m, str(tmp_path / "freq2"))
  with pytest.raises(ValueError, match="max_shard_size"):
    hf.save(model, str(tmp_path / "abc"), max_shard_size="abc")
  assert os.listdir(tmp_path) == []


def test_bfloat16_keeps_router_in_float32(model, tmp_path):
  out = hf.save(model, str(tmp_path / "bf"), dtype="bfloat16")
  f = SafetensorsFile(os.path.join(out, ST))
  for n in f.keys():
    assert f.dtype(n) == (np.float32 if n.endswith(".mlp.gate.weight") else ml_dtypes.bfloat16), n
  with open(os.path.join(out, "config.json")) as fh:
    assert json.load(fh)["dtype"] == "bfloat16"
  loaded = hf.load(out, dtype=jnp.bfloat16)
  assert loaded.cfg.param_dtype == "bfloat16"
  ref = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  got = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
  assert got.keys() == ref.keys()
  assert any(p[-1] == "gate" for p in got)
  for p, a in got.items():
    want = np.asarray(ref[p]).astype(np.float32 if p[-1] == "gate" else ml_dtypes.bfloat16)
    assert a.dtype == want.dtype and np.array_equal(np.asarray(a), want), p


def test_partial_rotary_factor_is_refused():
  d = config_to_hf(get_config("tiny"), "float32")
  d["rope_parameters"]["partial_rotary_factor"] = 0.5
  with pytest.raises(ConfigError, match="^rope_parameters.partial_rotary_factor:"):
    config_from_hf(d)


def test_remote_code_export_without_shared_experts_loads(tmp_path):
  """n_shared_experts: null and no zero-width shared_experts tensors (the remote-code layout)."""
  model = init_model(get_config("tiny", n_shared_experts=0), seed=2)
  out = tmp_path / "ck"
  hf.save(model, str(out))
  cfg = json.loads((out / "config.json").read_text())
  cfg["n_shared_experts"] = None
  (out / "config.json").write_text(json.dumps(cfg))
  f = SafetensorsFile(str(out / ST))
  keep = [k for k in f.keys() if "shared_experts" not in k]
  data = {k: np.array(f[k]) for k in keep}
  write_file(str(out / "tmp.safetensors"), [(k, data[k].shape, data[k].dtype) for k in keep],
             data.__getitem__)
  os.replace(out / "tmp.safetensors", out / ST)
  loaded = hf.load(str(out))
  assert loaded.cfg.n_shared_experts is None
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_runtime_overrides(ck):
  model = hf.load(str(ck), remat_policy="full", moe_impl="tiled", compute_dtype=jnp.bfloat16)
  assert (model.cfg.remat_policy, model.cfg.moe_impl, model.cfg.dtype) == ("full", "tiled",
                                                                           "bfloat16")
  with pytest.raises(TypeError, match="^param_dtype: pass the parameter dtype as dtype="):
    hf.load(str(ck), param_dtype="bfloat16")
  with pytest.raises(ConfigError, match="^remat_policy:"):
    hf.load(str(ck), remat_policy="sometimes")


def _small_tokenizer(path, vocab_size):
  import sysconfig
  from coder_jax.data.tokenizer import train_tokenizer
  root = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:60]
  train_tokenizer([open(os.path.join(root, n), encoding="utf-8").read() for n in names],
                  vocab_size, str(path))
  return str(path)


def test_tokenizer_problems_are_refused_before_anything_is_written(model, tmp_path):
  import tokenizers
  big = _small_tokenizer(tmp_path / "big" / "tokenizer.json", 600)   # the model has 512 ids
  plain = tokenizers.Tokenizer(tokenizers.models.BPE())               # no DeepSeek specials
  plain.save(str(tmp_path / "plain.json"))
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match="ids up to 599 but the model's vocab_size is 512"):
    hf.save(model, str(tmp_path / "out"), tokenizer=big)
  with pytest.raises(ValueError, match="lacks special token"):
    hf.save(model, str(tmp_path / "out"), tokenizer=str(tmp_path / "plain.json"))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    hf.save(model, str(tmp_path / "out"), tokenizer=str(tmp_path / "nope.json"))
  assert sorted(os.listdir(tmp_path)) == before


def test_load_tokenizer_files_reports_broken_files(model, ck, tmp_path):
  assert hf.load_tokenizer_files(str(ck)) is None   # config and weights only: no tokenizer
  tok = _small_tokenizer(tmp_path / "tok.json", 512)
  out = hf.save(model, str(tmp_path / "hf"), tokenizer=tok)
  from coder_jax.data.tokenizer import load_tokenizer
  files = hf.load_tokenizer_files(out)
  assert files.path == os.path.join(out, "tokenizer.json")
  assert files.tokenizer.get_vocab() == load_tokenizer(tok).get_vocab()
  with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
    fh.write("{broken")
  with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: not valid JSON"):
    hf.load_tokenizer_files(out)
  with open(os.path.join(out, "tokenizer.json"), "w") as fh:
    fh.write("[]")
  with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a tokenizer\.json"):
    hf.load_tokenizer_files(out)


def test_save_never_replaces_a_training_directory_or_a_source(model, tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "3").mkdir(parents=True)
  (run / "metrics.jsonl").write_text('{"step": 3}\n')
  with pytest.raises(ValueError, match="training directory.*checkpoints, metrics.jsonl"):
    hf.save(model, str(run), overwrite=True)
  earlier = hf.save(model, str(tmp_path / "earlier"))
  with pytest.raises(ValueError, match="source"):
    hf.save(model, earlier, overwrite=True, sources=[os.path.join(earlier, "model.safetensors")])
  assert sorted(os.listdir(tmp_path)) == ["earlier", "run"]
  assert sorted(os.listdir(run)) == ["checkpoints", "metrics.jsonl"]
  assert os.listdir(run / "checkpoints") == ["3"]
