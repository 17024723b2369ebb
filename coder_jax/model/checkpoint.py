"""The native model checkpoint: `model_config.json` + the parameters as an Orbax checkpoint."""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from coder_jax.files import new_directory
from coder_jax.model.config import config_from_dict, config_to_dict
from coder_jax.model.decoder import DeepseekV2, abstract_model

CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"


def save_model(model: DeepseekV2, directory: str) -> str:
  """Written beside the target and renamed into place, so a failed save leaves nothing."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory}: exists")
  with new_directory(directory) as tmp:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, PARAMS_NAME), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
      ckpt.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
      json.dump(config_to_dict(model.cfg), fh, indent=2)
  return directory


def load_model(directory: str, **runtime) -> DeepseekV2:
  """runtime: ModelConfig fields to change on load (dtype, attention_impl, remat_policy, ...)."""
  directory = os.path.abspath(directory)   # Orbax takes absolute paths only
  cfg_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: missing; is {directory} a coder_jax model checkpoint?")
  with open(cfg_path) as fh:
    cfg = config_from_dict(json.load(fh), **runtime)
  graphdef, state = abstract_model(cfg)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(os.path.join(directory, PARAMS_NAME), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
