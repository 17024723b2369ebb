"""The native model checkpoint: `model_config.json` + the parameters as an Orbax checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx

from coder_jax.model.config import config_from_dict, config_to_dict
from coder_jax.model.decoder import DeepseekV2

CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"


def save_model(model: DeepseekV2, directory: str) -> str:
  """Written beside the target and renamed into place, so a failed save leaves nothing."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory}: exists")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, PARAMS_NAME), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
      ckpt.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
      json.dump(config_to_dict(model.cfg), fh, indent=2)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load_model(directory: str, **runtime) -> DeepseekV2:
  """runtime: ModelConfig fields to change on load (dtype, attention_impl, remat_policy, ...)."""
  directory = os.path.abspath(directory)   # Orbax takes absolute paths only
  cfg_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing; is {directory} a coder_jax model checkpoint?")
  with open(cfg_path) as fh:
    cfg = config_from_dict(json.load(fh), **runtime)
  abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(os.path.join(directory, PARAMS_NAME), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
