"""Reward models <-> transformers' DeepseekV2ForSequenceClassification (num_labels = 1).

    from coder_jax.hf import seq_cls
    seq_cls.save(rm, "rm_hf", tokenizer="tokenizer.json")   # pad id from the tokenizer
    rm = seq_cls.load("rm_hf")

The export is the causal LM's (same streaming writer, same tensor names under `model.`) minus
`lm_head.weight`, plus `score.weight` [1, hidden]. transformers scores the rightmost token that
is not `pad_token_id`, so config.json must name a pad id that no scored sequence ends with: a
tokenizer's dedicated pad token, never EOS (every rendered response ends with EOS).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from coder_jax.hf.read import build_model, read_config_json, tensor_files
from coder_jax.hf.config import config_from_hf, config_to_hf
from coder_jax.hf.errors import CheckpointError
from coder_jax.hf.names import TensorSpec, tensor_specs
from coder_jax.hf.target import check_target
from coder_jax.hf.tokenizer_files import export_files
from coder_jax.hf.write import write_export
from coder_jax.model.config import ModelConfig
from coder_jax.model.reward import RewardModel

ARCHITECTURE = "DeepseekV2ForSequenceClassification"
HEAD = "score.weight"


def reward_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every tensor of the reward model's Hub checkpoint, in Hub order."""
  specs = [dataclasses.replace(s, path=None if s.path is None else ("model",) + s.path)
           for s in tensor_specs(cfg) if s.name != "lm_head.weight"]
  d = cfg.hidden_size
  specs.append(TensorSpec(HEAD, (1, d), ("score",), (), (d, 1), 1))
  return specs


def _pad_id(pad_token_id, tokenizer_ids: dict | None, cfg: ModelConfig, eos_id) -> int:
  pad = pad_token_id
  if pad is None and tokenizer_ids is not None:
    pad = tokenizer_ids["pad_token_id"]
  if pad is None:
    raise ValueError("pad_token_id: a reward model export needs one (transformers scores the "
                     "last token that is not pad_token_id); pass tokenizer= or pad_token_id=")
  if not 0 <= int(pad) < cfg.vocab_size:
    raise ValueError(f"pad_token_id: {pad} is outside the vocabulary [0, {cfg.vocab_size})")
  if eos_id is not None and int(pad) == int(eos_id):
    raise ValueError(f"pad_token_id: {pad} is the EOS id; transformers would score the token "
                     "before each response's EOS. Pass pad_token_id= an id no sequence ends "
                     "with (the tokenizer has no dedicated pad token)")
  return int(pad)


def save(model: RewardModel, out_dir: str, *, pad_token_id: int | None = None, dtype=None,
         max_shard_size="5GB", overwrite: bool = False, tokenizer: str | None = None,
         sources=()) -> str:
  """Write `model` as a DeepseekV2ForSequenceClassification checkpoint at out_dir.

  pad_token_id: default the tokenizer's pad token (required without a tokenizer). The other
  arguments are coder_jax.hf.save's: dtype of the weights, the tokenizer files written beside
  them, overwrite of an earlier export only, nothing at out_dir unless the whole save succeeds.
  """
  cfg = model.cfg
  out_dir = os.path.abspath(out_dir)
  check_target(out_dir, overwrite=overwrite, sources=sources)
  save_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  config = config_to_hf(cfg, save_dtype.name)
  extra, ids = {}, None
  if tokenizer is not None:
    extra, ids = export_files(tokenizer, vocab_size=cfg.vocab_size,
                              model_max_length=cfg.max_position_embeddings)
    config.update(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
  pad = _pad_id(pad_token_id, ids, cfg, config.get("eos_token_id"))
  # num_labels is not a config.json key: transformers derives it from id2label.
  config.update(architectures=[ARCHITECTURE], pad_token_id=pad, id2label={"0": "LABEL_0"},
                label2id={"LABEL_0": 0})
  return write_export(model, reward_specs(cfg), out_dir, config, extra, save_dtype,
                      max_shard_size)


def load(path: str, dtype=jnp.float32, *, mesh=None, compute_dtype=None,
         **runtime) -> RewardModel:
  """A DeepseekV2ForSequenceClassification checkpoint (num_labels 1) as a RewardModel; the
  arguments are coder_jax.hf.load's."""
  if "param_dtype" in runtime:
    raise TypeError("param_dtype: pass the parameter dtype as dtype= (activations: compute_dtype=)")
  d = read_config_json(path)
  cfg = config_from_hf(d, param_dtype=jnp.dtype(dtype).name,
                       dtype=jnp.dtype(compute_dtype or dtype).name, **runtime)
  where = tensor_files(path)
  if HEAD not in where:
    raise CheckpointError(
        f"{path}: no reward head: tensor {HEAD!r} is missing (config.json architectures: "
        f"{d.get('architectures')}); a reward model is a {ARCHITECTURE} export with one label")
  return build_model(where, reward_specs(cfg), cfg, RewardModel, mesh)


def pad_token_id(path: str) -> int | None:
  """The pad id an export's config.json names (the scorer pads with it, as transformers)."""
  pad = read_config_json(path).get("pad_token_id")
  return None if pad is None else int(pad)
