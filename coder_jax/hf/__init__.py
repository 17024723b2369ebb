"""Hugging Face checkpoints <-> the NNX model, streamed tensor by tensor.

    from coder_jax import hf
    model = hf.load("path/to/hf_dir", dtype=jnp.float32)
    logits = model(input_ids)
    hf.save(model, "out_dir", tokenizer="tokenizer.json")   # transformers' from_pretrained,
                                                             # AutoTokenizer and pipeline load it
    files = hf.load_tokenizer_files("path/to/hf_dir")  # its tokenizer.json, template, BOS/EOS ids

`load` builds each parameter with `jax.make_array_from_callback`, reading from memory-mapped
safetensors only the slice each device holds; `save` writes shard files one tensor at a time
into a directory beside the target and renames it into place only when everything is written;
it replaces only an earlier export (target.py), never a directory holding anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.hf.config import config_from_hf, config_to_hf
from coder_jax.hf.errors import CheckpointError
from coder_jax.hf.names import IGNORED_SUFFIXES, TensorSpec, tensor_specs
from coder_jax.hf.safetensors_io import SafetensorsError, SafetensorsFile, write_file
from coder_jax.hf.target import check_target
from coder_jax.hf.tokenizer_files import TokenizerFiles, export_files, load_tokenizer_files
from coder_jax.model.config import ConfigError, ModelConfig
from coder_jax.model.decoder import DeepseekV2
from coder_jax.parallel.rules import named_sharding

__all__ = ["CheckpointError", "TokenizerFiles", "check_target", "load", "load_config",
           "load_tokenizer_files", "read_config_json", "save"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config_json(path: str) -> dict:
  f = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint directory")
  if not os.path.exists(f):
    raise CheckpointError(f"{f}: missing (a Hugging Face checkpoint needs config.json)")
  try:
    with open(f) as fh:
      d = json.load(fh)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{f}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{f}: expected a JSON object")
  return d


def load_config(path: str, **runtime) -> ModelConfig:
  return config_from_hf(read_config_json(path), **runtime)


def tensor_files(path: str) -> dict[str, SafetensorsFile]:
  """Hub name -> the open file that holds it (single file, index, or every *.safetensors)."""
  index = os.path.join(path, INDEX_NAME)
  if os.path.exists(index):
    try:
      with open(index) as fh:
        weight_map = json.load(fh)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: has no weight_map")
    names = sorted(set(weight_map.values()))
  else:
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    weight_map = None
  if not names:
    raise CheckpointError(f"{path}: no *.safetensors files")
  opened = {}
  for n in names:
    full = os.path.join(path, n)
    if not os.path.exists(full):
      raise CheckpointError(f"{full}: listed in {INDEX_NAME} but missing")
    try:
      opened[n] = SafetensorsFile(full)
    except SafetensorsError as e:
      raise CheckpointError(str(e)) from None
  where = {}
  for n, f in opened.items():
    for key in f.keys():
      if weight_map is not None and weight_map.get(key) != n:
        continue
      if key in where:
        raise CheckpointError(f"tensor {key!r} appears in both {where[key].path} and {f.path}")
      where[key] = f
  return where


def _check(specs: list[TensorSpec], where: dict[str, SafetensorsFile], cfg: ModelConfig):
  wanted = {s.name for s in specs}
  for s in specs:
    if s.name not in where and s.path is None:  # an empty placeholder may be absent
      continue
    if s.name not in where:
      raise CheckpointError(f"missing tensor {s.name!r} (expected shape {list(s.hf_shape)})")
    got = where[s.name].shape(s.name)
    if got != s.hf_shape:
      raise CheckpointError(f"tensor {s.name!r} has shape {list(got)}, expected "
                            f"{list(s.hf_shape)} from config.json")
  for name in where:
    if name in wanted or name.endswith(IGNORED_SUFFIXES):
      continue
    if 0 in where[name].shape(name):  # holds no weights (e.g. a zero-width shared MLP)
      continue
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    raise CheckpointError(f"unexpected tensor {name!r} (not part of this config's model)")


def _reader(specs: list[TensorSpec], where, shape, dtype):
  """Callback for make_array_from_callback: fill one device's slice from the files."""
  by_index = {s.index: s for s in specs}
  lead = len(next(iter(specs)).index)

  def fill(idx):
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
    ranges = [range(*sl.indices(n)) for sl, n in zip(idx[:lead], shape[:lead])]
    trailing = idx[lead:]
    out = np.empty([len(r) for r in ranges] + [len(range(*sl.indices(n)))
                   for sl, n in zip(trailing, shape[lead:])], dtype)
    for pos in np.ndindex(*[len(r) for r in ranges]):
      s = by_index[tuple(r[p] for r, p in zip(ranges, pos))]
      out[pos] = np.asarray(s.to_ours(where[s.name][s.name])[trailing]).astype(dtype)
    return out

  return fill


def load(path: str, dtype=jnp.float32, *, mesh=None, compute_dtype=None, **runtime) -> DeepseekV2:
  """Load a Hub checkpoint directory as a DeepseekV2 model.

  dtype: parameter dtype (the router stays float32); compute_dtype: activations (default dtype).
  mesh: optional jax Mesh; parameters are then sharded by the logical-axis rules.
  runtime: further ModelConfig runtime fields (attention_impl, moe_impl, remat_policy, ...).
  """
  if "param_dtype" in runtime:
    raise TypeError("param_dtype: pass the parameter dtype as dtype= (activations: compute_dtype=)")
  pname = jnp.dtype(dtype).name
  cfg = load_config(path, param_dtype=pname, dtype=jnp.dtype(compute_dtype or dtype).name, **runtime)
  return build_model(tensor_files(path), tensor_specs(cfg), cfg, DeepseekV2, mesh)


def build_model(where: dict[str, SafetensorsFile], specs: list[TensorSpec], cfg: ModelConfig,
                model_cls, mesh=None):
  """model_cls(cfg, rngs=...) with every parameter read from the tensors `where` by `specs`
  (shared by the causal LM and the reward model, whose specs add a prefix and a head)."""
  _check(specs, where, cfg)
  groups: dict[tuple, list[TensorSpec]] = {}
  for s in specs:
    if s.path is None:
      continue
    groups.setdefault(s.path, []).append(s)
  abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.devices()[0]
  for p, var in nnx.to_flat_state(state):
    sd = var.get_value()
    if p not in groups:
      raise CheckpointError(f"model parameter {'.'.join(map(str, p))} has no Hub tensor")
    sharding = (named_sharding(mesh, var.get_metadata()["axes"], sd.shape) if mesh is not None
                else jax.sharding.SingleDeviceSharding(device))
    arr = jax.make_array_from_callback(sd.shape, sharding,
                                       _reader(groups[p], where, sd.shape, sd.dtype))
    var.set_value(arr)
  return nnx.merge(graphdef, state)


def _parse_size(size) -> int:
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.I)
  if not m:
    raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB')")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def _plan_shards(entries, max_bytes):
  shards, cur, cur_bytes = [], [], 0
  for e in entries:
    nbytes = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
    if cur and cur_bytes + nbytes > max_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(e)
    cur_bytes += nbytes
  shards.append(cur)
  return shards


def save(model: DeepseekV2, out_dir: str, *, dtype=None, max_shard_size="5GB",
         overwrite: bool = False, tokenizer: str | None = None, sources=()) -> str:
  """Write `model` as a Hub checkpoint (config.json + safetensors shards) at out_dir.

  dtype: dtype of the saved weights (default: the model's param dtype; the router is saved in
  float32, as transformers keeps it). tokenizer: the model's tokenizer.json (or a directory
  holding one), written with tokenizer_config.json and generation_config.json; its BOS/EOS ids
  go into config.json. overwrite: replace an earlier HF export only; a directory holding
  anything else, or one of `sources` (the paths the model came from), is refused. Nothing
  appears at out_dir unless the whole save succeeds.
  """
  cfg = model.cfg
  out_dir = os.path.abspath(out_dir)
  check_target(out_dir, overwrite=overwrite, sources=sources)
  save_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  config = config_to_hf(cfg, save_dtype.name)
  extra = {}
  if tokenizer is not None:
    extra, ids = export_files(tokenizer, vocab_size=cfg.vocab_size,
                              model_max_length=cfg.max_position_embeddings)
    # The tokenizer put these ids in the training data, so they are the model's.
    config.update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
  return write_export(model, tensor_specs(cfg), out_dir, config, extra, save_dtype,
                      max_shard_size)


def write_export(model, specs: list[TensorSpec], out_dir: str, config: dict, extra: dict,
                 save_dtype, max_shard_size) -> str:
  """Streams `model`'s tensors named by `specs` into shards, with config.json and the `extra`
  files, into a directory beside out_dir renamed into place only at the end (the caller has
  checked out_dir with check_target)."""
  out_dir = os.path.abspath(out_dir)
  flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model))}
  by_name = {s.name: s for s in specs}
  for s in specs:
    if s.path is None:
      continue
    arr = flat[s.path].get_value()
    if not getattr(arr, "is_fully_addressable", True):
      raise ValueError(f"{s.name}: parameter is not fully addressable from this process; "
                       "gather it before saving")

  def tensor_dtype(s: TensorSpec):
    return np.dtype(np.float32) if s.path and s.path[-1] == "gate" else save_dtype

  def produce(name):
    s = by_name[name]
    if s.path is None:
      return np.zeros(s.hf_shape, tensor_dtype(s))
    w = np.asarray(jax.device_get(flat[s.path].get_value()[s.index]))
    return np.ascontiguousarray(s.to_hf(w)).astype(tensor_dtype(s))

  shards = _plan_shards([(s.name, s.hf_shape, tensor_dtype(s)) for s in specs],
                        _parse_size(max_shard_size))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  try:
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for fname, entries in zip(names, shards):
      total += write_file(os.path.join(tmp, fname), entries, produce)
      weight_map.update({e[0]: fname for e in entries})
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
      json.dump(config, fh, indent=2)
    for name, text in extra.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "x"))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
