"""The NNX model -> a Hugging Face checkpoint directory: config.json, safetensors shards written
one tensor at a time, tokenizer files; the directory is renamed into place only when complete."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.files import new_directory
from coder_jax.hf.config import config_to_hf
from coder_jax.hf.names import TensorSpec, tensor_specs
from coder_jax.hf.read import INDEX_NAME, SINGLE_NAME
from coder_jax.hf.safetensors_io import write_file
from coder_jax.hf.target import check_target
from coder_jax.hf.tokenizer_files import export_files
from coder_jax.model.decoder import DeepseekV2

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
  with new_directory(out_dir, replace=True) as tmp:
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
  return out_dir
