"""Scoring (prompt, response) pairs with a trained reward model.

    from coder_jax import reward
    scorer = reward.load("runs/rm_hf")            # an HF export, or the stage's MODEL_DIR
    scores = scorer.score(["Write f"], ["def f(): ..."])   # float32 logits, one per pair

A pair is rendered with the SFT chat template (coder_jax.data.chat.ChatTemplate) and tokenized
as the SFT data and a sampler tokenize it (coder_jax.reward.data.encode_pairs, which the RM's
training data uses too): BOS, the prompt text up to "Assistant:" as one string, the response
as another, EOS. Rows are batched by length, right padded, and scored at
their last real token (RewardModel).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from coder_jax.data.chat import ChatTemplate
from coder_jax.data.tokenizer import EOS, PAD, load_tokenizer
from coder_jax.model.config import ConfigError
from coder_jax.model.reward import RewardModel
from coder_jax.reward.data import encode_pairs


class Scorer:
  """`score(prompts, responses)` and `score_ids(token id lists)` -> np.ndarray float32 [N]."""

  def __init__(self, model: RewardModel, tokenizer: tokenizers.Tokenizer, *,
               pad_id: int | None = None, template: ChatTemplate = ChatTemplate(),
               batch_size: int = 16, length_multiple: int = 64):
    self.model, self.template = model, template
    self.tokenizer = tokenizer
    if pad_id is None:
      pad_id = tokenizer.token_to_id(PAD)
    # Padding never reaches a real token (segment ids mask it), so any id in range will do.
    self.pad_id = tokenizer.token_to_id(EOS) if pad_id is None else int(pad_id)
    self.batch_size, self.length_multiple = batch_size, length_multiple
    graphdef, state = nnx.split(model)
    self._state = state
    self._forward = jax.jit(lambda st, ids, seg: nnx.merge(graphdef, st)(ids, seg))

  def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each rendered pair: [BOS, prompt ... "Assistant:", " response", EOS]."""
    return encode_pairs(self.tokenizer, prompts, responses, self.template)

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return self.score_ids(self.encode(prompts, responses))

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Scores of token id sequences (each already rendered, e.g. sampled by a policy)."""
    limit = self.model.cfg.max_position_embeddings
    for i, s in enumerate(sequences):
      if not 0 < len(s) <= limit:
        raise ValueError(f"sequence {i}: {len(s)} tokens; a scored sequence needs 1 to "
                         f"max_position_embeddings = {limit}")
    out = np.zeros(len(sequences), np.float32)
    # Similar lengths share a batch; every batch has batch_size rows (the last one padded with
    # empty rows) and a length rounded up, so few shapes are ever compiled.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for at in range(0, len(order), self.batch_size):
      rows = order[at:at + self.batch_size]
      m = self.length_multiple
      t = min(-(-max(len(sequences[i]) for i in rows) // m) * m, limit)
      ids = np.full((self.batch_size, t), self.pad_id, np.int32)
      seg = np.zeros((self.batch_size, t), np.int32)
      for r, i in enumerate(rows):
        ids[r, :len(sequences[i])] = sequences[i]
        seg[r, :len(sequences[i])] = 1
      scores = self._forward(self._state, jnp.asarray(ids), jnp.asarray(seg))
      out[rows] = np.asarray(scores)[:len(rows)]
    return out


def stored_param_names(model_dir: str, step: int | None = None) -> set[str] | None:
  """Top-level names of the parameters in a training MODEL_DIR's checkpoint `step` (default: the
  newest whose metadata reads; no array is read); None when none reads."""
  import orbax.checkpoint as ocp
  from coder_jax.train import checkpoint as ckpt
  mgr, directory = ckpt._read_only_manager(model_dir)
  try:
    steps = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
  finally:
    mgr.close()
  for s in steps:
    try:
      with ocp.PyTreeCheckpointer() as reader:
        meta = reader.metadata(os.path.join(directory, str(s), "state")).item_metadata
      return set(meta["params"])
    except Exception:  # noqa: BLE001 -- a damaged step: load_params names it
      continue
  return None


def has_reward_head(model_dir: str, step: int | None = None) -> bool:
  """Whether a training MODEL_DIR holds a reward model (a reward_model stage's run)."""
  return "score" in (stored_param_names(model_dir, step) or ())


def train_dir_model(model_dir: str, step: int | None = None, *, mesh=None,
                    **runtime) -> RewardModel:
  """The RewardModel of a reward_model stage's training MODEL_DIR (its checkpoint `step`,
  default the newest that restores); one clear error for a run without a reward head."""
  from coder_jax.train.checkpoint import load_params
  names = stored_param_names(model_dir, step)
  if names is not None and "score" not in names:
    raise ConfigError(f"{model_dir}: its checkpoint has no reward head ('score' is missing): "
                      "this is not a reward_model stage's training directory")
  return load_params(model_dir, step, mesh=mesh, model_cls=RewardModel, **runtime)[0]


def load(path: str, *, step: int | None = None, dtype=jnp.float32, batch_size: int = 16,
         template: ChatTemplate = ChatTemplate(), mesh=None, **runtime) -> Scorer:
  """A Scorer for an HF DeepseekV2ForSequenceClassification export (config.json) or a
  reward_model stage's MODEL_DIR (its checkpoint `step`, default the newest that restores, and
  its tokenizer.json). dtype: the activations' and an export's weights' (a checkpoint's master
  weights stay float32). mesh: where the parameters live (default one device); a stage that
  scores inside its own mesh (GRPO) passes it, as jit there takes no array committed to other
  devices. runtime: ModelConfig runtime fields (attention_impl, ...)."""
  from coder_jax.hf import seq_cls
  if os.path.isfile(os.path.join(path, "config.json")):
    if step is not None:
      raise ValueError(f"step: {path} is a Hugging Face export, which has no steps")
    model = seq_cls.load(path, dtype, mesh=mesh, **runtime)
    pad = seq_cls.pad_token_id(path)
  else:
    from coder_jax.train.checkpoint import CHECKPOINT_SUBDIR
    if not os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
      raise FileNotFoundError(f"{path}: neither a Hugging Face export (config.json) nor a "
                              f"training directory ({CHECKPOINT_SUBDIR}/)")
    model = train_dir_model(path, step, mesh=mesh, param_dtype="float32",
                            dtype=jnp.dtype(dtype).name, **runtime)
    pad = None
  tok_path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f"{path}: no tokenizer.json (the scorer renders text with it)")
  return Scorer(model, load_tokenizer(tok_path), pad_id=pad, template=template,
                batch_size=batch_size)
