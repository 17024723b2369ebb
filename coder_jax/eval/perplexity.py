"""Token-level cross entropy and perplexity of a model over packed batches.

Batches are the training pipeline's own (coder_jax.data.pipeline): int32 [batch, seq_len]
inputs / targets / segment_ids / positions / loss_weights, so documents are scored exactly as
the pretraining stage sees them. Padding (segment id 0, weight 0) is excluded; the mean is over
every scored token of every batch (not a mean of per-batch means, which would weight the short
last batch like a full one).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.train.losses import cross_entropy_sum


def _make_scorer(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def score(state, inputs_BT, targets_BT, segment_ids_BT, positions_BT, weights_BT):
    m = nnx.merge(graphdef, state)
    logits_BTV = m(inputs_BT, segment_ids_BT, positions_BT)
    # Weight only real tokens, even if a caller's loss_weights marks padding.
    w_BT = weights_BT.astype(jnp.float32) * (segment_ids_BT > 0)
    return cross_entropy_sum(logits_BTV, targets_BT, w_BT), w_BT.sum()

  return state, score


def perplexity(model, batches: Iterable[dict], *, max_batches: int | None = None,
               log: Callable[[str], None] | None = None, log_every: int = 10) -> dict:
  """{'cross_entropy' (nats / token), 'perplexity', 'bits_per_token', 'tokens', 'batches',
  'seconds', 'tokens_per_s'} of `model` over `batches` (dicts of [batch, seq_len] arrays)."""
  state, score = _make_scorer(model)
  ce_sum, tokens, n = 0.0, 0.0, 0
  t0 = time.perf_counter()
  # islice: stop before pulling a batch that will not be scored (each costs a pipeline read).
  for batch in itertools.islice(batches, max_batches):
    b = {k: jnp.asarray(batch[k], jnp.int32) for k in ("inputs", "targets", "segment_ids")}
    positions = batch.get("positions")
    if positions is None:  # restart per segment, as the pipeline writes them
      from coder_jax.model import segment_positions
      positions = segment_positions(b["segment_ids"])
    weights = batch.get("loss_weights")
    weights = (np.asarray(batch["segment_ids"]) > 0) if weights is None else weights
    s, w = score(state, b["inputs"], b["targets"], b["segment_ids"],
                 jnp.asarray(positions, jnp.int32), jnp.asarray(weights, jnp.int32))
    # Sum on the host in float64: float32 sums drift over millions of tokens.
    ce_sum += float(s)
    tokens += float(w)
    n += 1
    if log and n % log_every == 0:
      log(f"batch {n}: {int(tokens)} tokens, cross entropy {ce_sum / max(tokens, 1):.4f}")
  dt = time.perf_counter() - t0
  if tokens == 0:
    raise ValueError("perplexity: the batches hold no scored (non-padding) tokens")
  ce = ce_sum / tokens
  return {"cross_entropy": ce, "perplexity": math.exp(ce), "bits_per_token": ce / math.log(2),
          "tokens": int(tokens), "batches": n, "seconds": dt, "tokens_per_s": tokens / dt}


def _splits_with_data(dataset_dir: str) -> list[str]:
  """The splits of a built corpus that hold at least one document (from its build_stats.json,
  which `coder_jax.data build` writes beside the dataset: no TensorFlow needed to read it)."""
  with open(os.path.join(dataset_dir, "build_stats.json")) as fh:
    per_split = json.load(fh).get("per_split_language", {})
  return sorted(s for s, langs in per_split.items() if any(langs.values()))


def validation_batches(data_dir: str, *, seq_len: int, batch_size: int,
                       split: str = "validation", tokenizer: str | None = None,
                       task: str | None = None, fim_rate: float = 0.0, seed: int = 0,
                       dataset: str | None = None):
  """One pass (no shuffling, no repeat) over `split` of the code mixture built in DATA_DIR, as
  the pretraining stage's pipeline packs it. FIM is off by default so the number is plain
  left-to-right perplexity, comparable between models trained with different FIM rates.

  data_dir: a DATA_DIR (`python -m coder_jax.data build --out`) or its dataset directory;
  tokenizer: default DATA_DIR/tokenizer.json, the one the data was built with; dataset: which
  build, when DATA_DIR holds several."""
  from coder_jax.data.layout import find_dataset
  from coder_jax.data.fim import FimConfig
  from coder_jax.data.pipeline import DataConfig, Pipeline
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir: {data_dir}: no such directory")
  dataset_dir = find_dataset(data_dir, dataset)
  splits = _splits_with_data(dataset_dir)
  if split not in splits:  # else the mixture fails later with "no language has a positive rate"
    raise ValueError(f"--split: {data_dir} has no {split!r} data; splits with data: "
                     f"{', '.join(splits) or 'none'}")
  tok = tokenizer or os.path.join(data_dir, "tokenizer.json")
  if not os.path.exists(tok):
    raise FileNotFoundError(f"--tokenizer: {tok}: missing (pass the tokenizer the data was "
                            "built with)")
  cfg = DataConfig(dataset_dir, tok, seq_len=seq_len, batch_size=batch_size, split=split,
                   seed=seed, shuffle=False, fim=FimConfig(rate=fim_rate, seed=seed), task=task)
  return Pipeline(cfg, num_epochs=1)


def format_summary(r: dict, what: str = "") -> str:
  return "\n".join([
      f"perplexity {r['perplexity']:.4f}{'  (' + what + ')' if what else ''}",
      f"cross entropy {r['cross_entropy']:.4f} nats/token ({r['bits_per_token']:.4f} bits)",
      f"tokens     {r['tokens']:,} non-padding in {r['batches']} batches, {r['seconds']:.1f} s "
      f"({r['tokens_per_s']:,.0f} tokens/s)"])
