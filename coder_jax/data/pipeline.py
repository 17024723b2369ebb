"""Packed training batches from the code mixture: deterministic, host-sharded, resumable.

Packing is next-fit over pieces of at most seq_len tokens, in numpy (seqio's tf.while packer
batches seq_len documents per round, which at 4096 is slow and memory hungry).
A batch is a dict of int32 [batch, seq_len] numpy arrays in the model's packed-sequence input:
`inputs` (BOS-shifted targets per segment), `targets`, `segment_ids` (0 = padding), `positions`
(restart per segment) and `loss_weights`. Resuming skips deterministically to the next batch:
the stream is a pure function of (seed, shard), so `state()` is just the batch count.
`tokenizer_path` names the tokenizer.json the tokens come from, for a run to record.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import weakref
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


def pack(pieces: Iterator[np.ndarray], seq_len: int, bos_id: int) -> Iterator[dict]:
  """Next-fit packing of token pieces (each <= seq_len) into rows of exactly seq_len.

  Within a segment, inputs are the targets shifted right behind BOS; segment ids count from 1
  and 0 marks padding, which carries no loss.
  """
  buf: list[np.ndarray] = []
  used = 0
  for piece in pieces:
    if len(piece) > seq_len:
      raise ValueError(f"seq_len: a piece of {len(piece)} tokens exceeds {seq_len}")
    if not len(piece):
      continue
    if used + len(piece) > seq_len:
      yield _row(buf, seq_len, bos_id)
      buf, used = [], 0
    buf.append(piece)
    used += len(piece)
  if buf:
    yield _row(buf, seq_len, bos_id)


def _row(pieces: list[np.ndarray], seq_len: int, bos_id: int) -> dict:
  row = {k: np.zeros(seq_len, np.int32) for k in
         ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
  at = 0
  for seg, p in enumerate(pieces, start=1):
    n = len(p)
    row["targets"][at:at + n] = p
    row["inputs"][at] = bos_id
    row["inputs"][at + 1:at + n] = p[:-1]
    row["segment_ids"][at:at + n] = seg
    row["positions"][at:at + n] = np.arange(n)
    row["loss_weights"][at:at + n] = 1
    at += n
  return row


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
  # A tf.data iterator still running py_function work when the interpreter finalizes can hang
  # the exit for good; stopping it while Python is whole avoids that.
  for p in list(_OPEN):
    p.close()


class Pipeline:
  """Iterator over numpy batches for one host (shard `shard_index` of `num_shards`)."""

  def __init__(self, cfg: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
               start_batch: int = 0, num_epochs: int | None = None):
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index: must be in [0, {num_shards}), got {shard_index}")
    if start_batch < 0:
      raise ValueError(f"start_batch: must be >= 0, got {start_batch}")
    self.cfg, self.shard_index, self.num_shards = cfg, shard_index, num_shards
    self.batches = start_batch  # batches consumed, counting those a resume skips
    self.num_epochs = num_epochs
    self._rows = None
    tok = os.path.abspath(cfg.tokenizer)  # the file, also when cfg names an HF model directory
    self.tokenizer_path = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
    _OPEN.add(self)

  def close(self) -> None:
    """Stops the tf.data work behind the stream; a later next() restarts it where it was."""
    rows, self._rows = self._rows, None
    if rows is not None:
      rows.close()

  def pieces(self):
    """The mixture's (or task's) token pieces for this shard: FIM'd, EOS'd, split, sampled."""
    import seqio
    from coder_jax.data.tasks import register_code_tasks
    cfg = self.cfg
    name = register_code_tasks(cfg.data_dir, cfg.tokenizer, fim=cfg.fim,
                               rates=dict(cfg.rates) if cfg.rates else None,
                               long_doc_min_tokens=cfg.long_doc_min_tokens,
                               long_doc_factor=cfg.long_doc_factor, rate_split=cfg.split)
    provider = seqio.get_mixture_or_task(cfg.task or name)
    if cfg.split not in provider.splits:
      raise ValueError(f"split: {provider.name} has no {cfg.split!r} data "
                       f"(it has: {', '.join(provider.splits) or 'none'})")
    self.vocabulary = provider.output_features["targets"].vocabulary
    ds = provider.get_dataset(
        sequence_length={"targets": cfg.seq_len}, split=cfg.split, shuffle=cfg.shuffle,
        num_epochs=self.num_epochs, seed=cfg.seed,
        shard_info=seqio.ShardInfo(self.shard_index, self.num_shards))
    return (ex["targets"] for ex in ds.prefetch(64).as_numpy_iterator())

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._rows is None:
      pieces = self.pieces()
      self._rows = pack(pieces, self.cfg.seq_len, self.vocabulary.bos_id)
      for _ in range(self.batches):  # deterministic stream: skipping is exact resumption
        self._batch()
    batch = self._batch()
    self.batches += 1
    return batch

  def _batch(self) -> dict[str, np.ndarray]:
    """batch_size rows; at the end of a finite pass the last batch is filled with padding rows
    (segment id 0, no loss), so no token is dropped."""
    rows = []
    for _ in range(self.cfg.batch_size):
      try:
        rows.append(next(self._rows))
      except StopIteration:
        if not rows:
          raise
        rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def state(self) -> dict:
    """Save with the training checkpoint; `Pipeline(cfg, start_batch=state['batches'])`."""
    return {"batches": self.batches, "shard_index": self.shard_index,
            "num_shards": self.num_shards, "seed": self.cfg.seed}
