"""Packed training batches from the code mixture: deterministic, host-sharded, resumable.

A batch is a dict of int32 [batch, seq_len] numpy arrays in the model's packed-sequence input:
`inputs` (BOS-shifted targets per segment), `targets`, `segment_ids` (0 = padding), `positions`
(restart per segment) and `loss_weights`. Resuming skips deterministically to the next batch:
the stream is a pure function of (seed, shard), so `state()` is just the batch count.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from coder_jax.data.fim import FimConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_dir: str
  tokenizer: str
  seq_len: int = 4096
  batch_size: int = 8
  split: str = "train"
  seed: int = 0
  shuffle: bool = True
  fim: FimConfig = FimConfig()
  rates: tuple[tuple[str, float], ...] | None = None
  long_doc_min_tokens: int = 0
  long_doc_factor: int = 1
  task: str | None = None          # one language task instead of the mixture

  def __post_init__(self):
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


_KEYS = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets",
         "decoder_segment_ids": "segment_ids", "decoder_positions": "positions",
         "decoder_loss_weights": "loss_weights"}


class Pipeline:
  """Iterator over numpy batches for one host (shard `shard_index` of `num_shards`)."""

  def __init__(self, cfg: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
               start_batch: int = 0, num_epochs: int | None = None):
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index: must be in [0, {num_shards}), got {shard_index}")
    self.cfg, self.shard_index, self.num_shards = cfg, shard_index, num_shards
    self.batches = start_batch
    self.num_epochs = num_epochs
    self._it = None

  def dataset(self):
    import seqio
    import tensorflow as tf
    from coder_jax.data.tasks import register_code_tasks
    cfg = self.cfg
    name = register_code_tasks(cfg.data_dir, cfg.tokenizer, fim=cfg.fim,
                               rates=dict(cfg.rates) if cfg.rates else None,
                               long_doc_min_tokens=cfg.long_doc_min_tokens,
                               long_doc_factor=cfg.long_doc_factor)
    if cfg.task:
      name = cfg.task
    vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
    ds = seqio.get_dataset(
        name, task_feature_lengths={"targets": cfg.seq_len}, dataset_split=cfg.split,
        shuffle=cfg.shuffle, num_epochs=self.num_epochs, seed=cfg.seed,
        shard_info=seqio.ShardInfo(self.shard_index, self.num_shards),
        feature_converter=seqio.DecoderFeatureConverter(pack=True, bos_id=vocab.bos_id),
        verbose=False)
    ds = ds.map(lambda ex: {v: tf.cast(ex[k], tf.int32) for k, v in _KEYS.items()})
    ds = ds.batch(self.cfg.batch_size, drop_remainder=True)
    return ds.skip(self.batches).prefetch(2)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset().as_numpy_iterator()
    batch = next(self._it)
    self.batches += 1
    return batch

  def state(self) -> dict:
    """Save with the training checkpoint; `Pipeline(cfg, start_batch=state['batches'])`."""
    return {"batches": self.batches, "shard_index": self.shard_index,
            "num_shards": self.num_shards, "seed": self.cfg.seed}
