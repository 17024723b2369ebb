"""Reward-model objectives (pointwise and pairwise) for the shared train step, and the numpy
metrics a held-out split is judged by (accuracy, ROC AUC, expected calibration error).

Batches (every row holds one sequence, right padded, segment id 0 = padding):
  pointwise  inputs, segment_ids, positions [B, T]; labels [B] (float: 1 passed, 0 failed;
             soft labels in between are fine); row_weights [B] (0 for padding rows)
  pairwise   chosen_{inputs,segment_ids,positions} and rejected_{...} [P, T], one pair per row
             index; row_weights [P]. Separate keys rather than interleaved rows because the
             step splits micro-batches by row (row r -> micro-batch r % accum), which would tear
             an interleaved pair apart; here every micro-batch holds whole pairs.
Both losses are weighted means over the whole batch's row weight ("examples"), and every metric
is a sum over the micro-batch divided by a whole-batch norm, so micro-batches add up to the
batch. DeepSeek-V2's balance losses are added as in pretraining (the backbone stays an MoE).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.step import ROW_AXES, TOKEN_AXES, Objective, expert_load, moe_balance

SEQUENCE_KEYS = ("inputs", "segment_ids", "positions")
SIDES = ("chosen", "rejected")
POINTWISE_AXES = {**{k: TOKEN_AXES for k in SEQUENCE_KEYS}, "labels": ROW_AXES,
                  "row_weights": ROW_AXES}
PAIRWISE_AXES = {**{f"{side}_{k}": TOKEN_AXES for side in SIDES for k in SEQUENCE_KEYS},
                 "row_weights": ROW_AXES}


def binary_cross_entropy(scores, labels):
  """-[y log σ(s) + (1 - y) log(1 - σ(s))] per element, written so large |s| stays finite."""
  s = scores.astype(jnp.float32)
  return jnp.logaddexp(0.0, s) - labels.astype(jnp.float32) * s


def bradley_terry(chosen, rejected):
  """-log σ(s_chosen - s_rejected) per pair."""
  return jnp.logaddexp(0.0, -(chosen.astype(jnp.float32) - rejected.astype(jnp.float32)))


def _norms(row_weights, segment_ids: list) -> dict:
  """examples: the batch's total row weight (1 when it is 0, so an empty batch gives 0, not
  nan); rows / tokens: the sequences holding tokens and their tokens (balance losses, logs)."""
  w = row_weights.astype(jnp.float32).sum()
  real = [(s > 0) for s in segment_ids]
  return {"examples": jnp.where(w > 0, w, 1.0),
          "rows": jnp.maximum(sum(r.any(axis=1).sum() for r in real).astype(jnp.float32), 1.0),
          "tokens": sum(r.sum() for r in real).astype(jnp.float32)}


def pointwise_objective(cfg, alphas: BalanceLossConfig = BalanceLossConfig()) -> Objective:
  """Binary cross-entropy of σ(score) against the 0-1 test signal (`labels`)."""

  def loss_fn(model, mb, norms):
    scores, aux = model(mb["inputs"], mb["segment_ids"], mb["positions"], return_aux=True)
    w, y = mb["row_weights"].astype(jnp.float32), mb["labels"].astype(jnp.float32)
    n = norms["examples"]
    loss = jnp.sum(w * binary_cross_entropy(scores, y)) / n
    bal, metrics = moe_balance(cfg, alphas, aux, norms)
    right = ((scores > 0) == (y > 0.5)).astype(jnp.float32)
    return loss + bal, {"reward_loss": loss, "accuracy": jnp.sum(w * right) / n,
                        "score_mean": jnp.sum(w * scores) / n,
                        "label_mean": jnp.sum(w * y) / n, **metrics}

  norms = lambda b: _norms(b["row_weights"], [b["segment_ids"]])
  return Objective(loss_fn, POINTWISE_AXES, norms, expert_load)


def pairwise_objective(cfg, alphas: BalanceLossConfig = BalanceLossConfig()) -> Objective:
  """Bradley-Terry: -log σ(s_chosen - s_rejected) over the pairs."""

  def loss_fn(model, mb, norms):
    # One forward over [chosen; rejected]: the same shapes, so the layers trace once.
    both = {k: jnp.concatenate([mb[f"chosen_{k}"], mb[f"rejected_{k}"]]) for k in SEQUENCE_KEYS}
    scores, aux = model(both["inputs"], both["segment_ids"], both["positions"], return_aux=True)
    p = mb["chosen_inputs"].shape[0]
    sc, sr = scores[:p], scores[p:]
    w, n = mb["row_weights"].astype(jnp.float32), norms["examples"]
    loss = jnp.sum(w * bradley_terry(sc, sr)) / n
    bal, metrics = moe_balance(cfg, alphas, aux, norms)
    return loss + bal, {"reward_loss": loss,
                        "accuracy": jnp.sum(w * (sc > sr).astype(jnp.float32)) / n,
                        "margin": jnp.sum(w * (sc - sr)) / n,
                        "chosen_score": jnp.sum(w * sc) / n,
                        "rejected_score": jnp.sum(w * sr) / n, **metrics}

  norms = lambda b: _norms(b["row_weights"], [b["chosen_segment_ids"], b["rejected_segment_ids"]])
  return Objective(loss_fn, PAIRWISE_AXES, norms, expert_load)


# --- Held-out metrics (numpy, on the host).


def _sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def average_ranks(x) -> np.ndarray:
  """1-based ranks of x, ties sharing the mean of the ranks they span."""
  x = np.asarray(x)
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  starts = np.concatenate([[0], np.flatnonzero(xs[1:] != xs[:-1]) + 1])
  ends = np.concatenate([starts[1:], [len(x)]])
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return ranks


def roc_auc(scores, labels) -> float:
  """P(score of a positive > score of a negative) + P(tie) / 2, from the Mann-Whitney rank
  sum (O(n log n)); nan when either class is absent."""
  s = np.asarray(scores, np.float64).ravel()
  pos = np.asarray(labels).ravel() > 0.5
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if not n_pos or not n_neg:
    return float("nan")
  rank_sum = average_ranks(s)[pos].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(scores, labels, bins: int = 10) -> float:
  """Σ_b (n_b / n) |mean label - mean σ(score)| over `bins` equal-width bins of σ(score) in
  [0, 1] (the last bin closed); nan for no examples."""
  p = _sigmoid(np.asarray(scores, np.float64).ravel())
  y = np.asarray(labels, np.float64).ravel()
  if not len(p):
    return float("nan")
  b = np.minimum((p * bins).astype(np.int64), bins - 1)
  gap = np.abs(np.bincount(b, y, bins) - np.bincount(b, p, bins))   # n_b * |mean y - mean p|
  return float(gap.sum() / len(p))


def reward_metrics(scores, labels) -> dict:
  """Held-out metrics of a pointwise RM: accuracy (σ(score) > 0.5 vs label), ROC AUC, ECE
  (10 bins), and the positive rate; `scores` are logits."""
  s = np.asarray(scores, np.float64).ravel()
  y = np.asarray(labels, np.float64).ravel()
  if s.shape != y.shape:
    raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
  return {"accuracy": float(np.mean((s > 0) == (y > 0.5))) if len(s) else float("nan"),
          "auc": roc_auc(s, y), "ece": expected_calibration_error(s, y),
          "positive_rate": float(y.mean()) if len(s) else float("nan"), "examples": len(s)}


def pairwise_metrics(chosen, rejected) -> dict:
  """Held-out metrics of a pairwise RM: how often chosen outscores rejected (ties count half),
  and the mean margin."""
  c, r = np.asarray(chosen, np.float64).ravel(), np.asarray(rejected, np.float64).ravel()
  if not len(c):
    return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
  return {"accuracy": float(np.mean((c > r) + 0.5 * (c == r))),
          "margin": float(np.mean(c - r)), "pairs": len(c)}
