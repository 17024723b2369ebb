"""The reward model: DeepSeek-V2's backbone and a scalar head read at each row's last real token.

Laid out as transformers' DeepseekV2ForSequenceClassification with num_labels = 1: `model` (the
decoder without an LM head) and `score` (hidden -> 1, no bias), so the Hub names are
`model.*` and `score.weight`. Rows hold one sequence each, right padded (segment id 0); the score
of a row is the head applied to the final-normed hidden state of its last position with segment
id > 0, which is the token transformers picks (the rightmost one that is not pad_token_id).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coder_jax.model.config import ModelConfig
from coder_jax.model.decoder import DeepseekV2, abstract_model
from coder_jax.model.layers import dtype_of, normal_param


def last_real_index(segment_ids_BT):
  """Per row, the last position with segment id > 0 (0 for a row of padding only)."""
  t = segment_ids_BT.shape[1]
  return jnp.max(jnp.where(segment_ids_BT > 0, jnp.arange(t), 0), axis=1)


class RewardModel(nnx.Module):
  """`rm(inputs_BT, segment_ids_BT)` -> scores [B] (float32), one scalar per row.

  `return_aux=True` also returns the backbone's aux dict ({'router': ...}) for the balance
  losses. A row with no real token gets the score of position 0 (give it no weight).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Tied embeddings build no lm_head and change nothing else the backbone computes
    # (hidden_states never reads the head), so no unused vocab x hidden matrix is carried.
    self.model = DeepseekV2(cfg.replace(tie_word_embeddings=True), rngs=rngs)
    # As transformers' _init_weights draws the fresh head; params_from_policy zeroes it instead.
    self.score = normal_param(rngs, (cfg.hidden_size, 1), ("embed", None),
                              cfg.initializer_range, dtype_of(cfg.param_dtype))

  def __call__(self, inputs_BT, segment_ids_BT=None, positions_BT=None, return_aux=False):
    inputs_BT = jnp.asarray(inputs_BT)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(inputs_BT.shape, jnp.int32)
    segment_ids_BT = jnp.asarray(segment_ids_BT)
    h_BTD, aux = self.model.hidden_states(inputs_BT, segment_ids_BT, positions_BT)
    dt = dtype_of(self.cfg.dtype)
    # Scoring every position and keeping one is a [B, T] select, where gathering one position
    # of a sequence-sharded [B, T, D] would move hidden states between devices; the extra
    # matmul is T x D per row, nothing beside the backbone.
    s_BT = jnp.einsum("btd,dk->btk", h_BTD.astype(dt), self.score[...].astype(dt),
                      preferred_element_type=jnp.float32)[..., 0]
    last_B = last_real_index(segment_ids_BT)
    pick_BT = jnp.arange(s_BT.shape[1]) == last_B[:, None]
    scores_B = jnp.sum(jnp.where(pick_BT, s_BT, 0.0), axis=1)
    return (scores_B, aux) if return_aux else scores_B


def params_from_policy(policy_params: dict, cfg: ModelConfig, *, seed: int = 0,
                       head_std: float = 0.0) -> dict:
  """RewardModel parameters (a pure dict) from a policy's DeepseekV2 parameters: the backbone
  as is (its lm_head dropped), the head N(0, head_std^2) drawn from `seed`.

  The default head_std = 0 starts every score at 0 (σ = 0.5, margin 0), so the first steps
  are not spent unlearning random preferences that a normal head of std initializer_range puts
  on the policy's large hidden states (its scores have std ~ 0.02 * sqrt(hidden) ~ 1 at
  Lite's width). One output unit has no symmetry to break: its gradient h * (σ(s) - y) is
  non-zero from the first step, and the backbone's from the second.
  """
  backbone = {k: v for k, v in policy_params.items() if k != "lm_head"}
  want = nnx.to_pure_dict(abstract_model(cfg, RewardModel)[1].filter(nnx.Param))["model"]
  got_tree, want_tree = jax.tree.structure(backbone), jax.tree.structure(want)
  if got_tree != want_tree:
    raise ValueError(f"policy parameters do not match the reward model's backbone for this "
                     f"config: got {got_tree}, expected {want_tree}")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(backbone)[0],
                          jax.tree.leaves(want)):
    if a.shape != b.shape:
      raise ValueError(f"policy parameter {jax.tree_util.keystr(path)} has shape "
                       f"{tuple(a.shape)}, the config expects {tuple(b.shape)}")
  head = jax.random.normal(jax.random.key(seed), (cfg.hidden_size, 1), jnp.float32) * head_std
  return {"model": backbone, "score": head.astype(backbone["embed_tokens"].dtype)}
