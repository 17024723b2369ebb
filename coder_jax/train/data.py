"""Where a run's batches come from. Each host reads only its own rows of the global batch.

- `CodeData`: the code mixture of `coder_jax.data` over the corpus DATA_DIR holds (see
  `coder_jax.data.prepare.for_training`: the one built there, the one named by `dataset` or
  `sources`, or the embedded default corpus built into a new DATA_DIR). Host i of n reads shard
  i of n; the stream is a function of (seed, shard), so it depends on the number of hosts.
- `synthetic_data`: random packed rows, a pure function of (seed, step, global row index), so
  every host count and mesh sees the same global batch (for benchmarks and equivalence tests).
Both give numpy dicts inputs/targets/segment_ids/positions/loss_weights of int32 [rows, seq_len]
and resume from a batch count. A stream's `tokenizer_path` is the absolute path of the
tokenizer.json its tokens come from (None for synthetic data), for the run to record.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CodeData:
  data_dir: str = gin.REQUIRED
  mixture_or_task_name: str = "code_mixture"   # or one language's task, e.g. "code_python"
  sources: tuple[str, ...] | None = None    # build/read this corpus; default: see the docstring
  dataset: str | None = None                # or read the build of this name (`data build` says)
  tokenizer: str | None = None              # default: DATA_DIR/tokenizer.json (trained if absent)
  vocab_size: int | None = None             # of a tokenizer trained here; default: the model's
  fim_rate: float = 0.5
  fim_spm_rate: float = 0.5
  split: str = "train"
  seed: int = 0
  long_doc_min_tokens: int = 0
  long_doc_factor: int = 1

  def open(self, *, model_vocab: int, batch_rows: int, seq_len: int, shard: int, num_shards: int,
           start_batch: int):
    from coder_jax.data.fim import FimConfig
    from coder_jax.data.pipeline import DataConfig, Pipeline
    from coder_jax.data.prepare import for_training
    from coder_jax.data.tokenizer import load_tokenizer
    import jax
    if isinstance(self.sources, str):  # gin: CodeData.sources = '/src' instead of ['/src']
      raise ValueError(f"CodeData.sources: a list of paths, got the string {self.sources!r}")
    args = (self.data_dir, list(self.sources) if self.sources else None, self.dataset)
    kw = dict(vocab_size=self.vocab_size or model_vocab, tokenizer=self.tokenizer)
    if jax.process_count() > 1:  # one host builds a shared DATA_DIR, the others then reuse it
      from jax.experimental import multihost_utils
      if jax.process_index() == 0:
        for_training(*args, **kw)
      multihost_utils.sync_global_devices("coder_jax: data prepared")
    dataset_dir, tok = for_training(*args, **kw)
    n = load_tokenizer(tok).get_vocab_size(with_added_tokens=True)
    if n > model_vocab:
      raise ValueError(f"vocab_size: the tokenizer {tok} has {n} tokens but the model's "
                       f"vocab_size is {model_vocab}; set model_config.vocab_size >= {n} or use "
                       "a smaller tokenizer (CodeData.vocab_size, or a fresh DATA_DIR)")
    cfg = DataConfig(dataset_dir, tok, seq_len=seq_len, batch_size=batch_rows, split=self.split,
                     seed=self.seed, fim=FimConfig(rate=self.fim_rate, spm_rate=self.fim_spm_rate,
                                                   seed=self.seed),
                     long_doc_min_tokens=self.long_doc_min_tokens,
                     long_doc_factor=self.long_doc_factor,
                     task=None if self.mixture_or_task_name == "code_mixture"
                     else self.mixture_or_task_name)
    return Pipeline(cfg, shard_index=shard, num_shards=num_shards, start_batch=start_batch)


class SyntheticStream:
  tokenizer_path = None  # random ids: no tokenizer made them

  def __init__(self, vocab: int, global_batch: int, seq_len: int, seed: int, rows: range,
               start_batch: int, max_segments: int):
    self.vocab, self.global_batch, self.seq_len, self.seed = vocab, global_batch, seq_len, seed
    self.rows, self.batches, self.max_segments = rows, start_batch, max_segments

  def _row(self, step: int, row: int) -> dict:
    rng = np.random.default_rng([self.seed, step, row])
    t = self.seq_len
    cuts = np.sort(rng.choice(np.arange(1, t), size=min(self.max_segments - 1, t - 1),
                              replace=False)) if self.max_segments > 1 else np.array([], int)
    used = int(rng.integers(t * 3 // 4, t + 1))
    seg = np.zeros(t, np.int32)
    bounds = [0] + [c for c in cuts.tolist() if c < used] + [used]
    for i in range(len(bounds) - 1):
      seg[bounds[i]:bounds[i + 1]] = i + 1
    targets = rng.integers(3, self.vocab, t).astype(np.int32)
    pos = np.zeros(t, np.int32)
    inputs = np.zeros(t, np.int32)
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      pos[idx] = np.arange(len(idx))
      inputs[idx[0]] = 1
      inputs[idx[1:]] = targets[idx[:-1]]
    targets = np.where(seg > 0, targets, 0)
    return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos,
            "loss_weights": (seg > 0).astype(np.int32)}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [self._row(self.batches, r) for r in self.rows]
    self.batches += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def state(self) -> dict:
    return {"batches": self.batches}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SyntheticData:
  seed: int = 0
  max_segments: int = 3

  def open(self, *, model_vocab: int, batch_rows: int, seq_len: int, shard: int, num_shards: int,
           start_batch: int):
    first = shard * batch_rows
    return SyntheticStream(model_vocab, batch_rows * num_shards, seq_len, self.seed,
                           range(first, first + batch_rows), start_batch, self.max_segments)
