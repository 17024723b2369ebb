"""Hugging Face checkpoint directories -> the NNX model: config.json, the safetensors files
(single, indexed, or every *.safetensors), each parameter built from the slices its devices hold."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.hf.config import config_from_hf
from coder_jax.hf.errors import CheckpointError
from coder_jax.hf.names import IGNORED_SUFFIXES, TensorSpec, tensor_specs
from coder_jax.hf.safetensors_io import SafetensorsError, SafetensorsFile
from coder_jax.model.config import ModelConfig
from coder_jax.model.decoder import DeepseekV2, abstract_model
from coder_jax.parallel.rules import named_sharding

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
  graphdef, state = abstract_model(cfg, model_cls)
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
