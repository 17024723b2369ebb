"""Packed training batches from the code mixture: deterministic, host-sharded, resumable.

Packing is next-fit over pieces of at most seq_len tokens, in numpy (seqio's tf.while packer
batches seq_len documents per round, which at 4096 is slow and memory hungry).
A batch is a dict of int32 [batch, seq_len] numpy arrays in the model's packed-sequence input:
`inputs` (BOS-shifted targets per segment), `targets`, `segment_ids` (0 = padding), `positions`
(restart per segment) and `loss_weights`. `tokenizer_path` names the tokenizer.json the tokens
come from, for a run to record.

Resuming takes constant time: the pieces come from `stream.py`, whose position is a few integers
per language, and `state()` (saved with each checkpoint) holds the position where the packer's
open row began, so `Pipeline(cfg, position=state)` re-reads at most that row's documents and
continues bit for bit, at batch 10 or 100,000 alike. A state from before this (a batch count
only) resumes by replaying the earlier SeqIO stream (`legacy` below), exact and slow.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import sys
import threading
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


def tracked_rows(source, seq_len: int, bos_id: int) -> Iterator[tuple[dict, dict]]:
  """`pack` over `source.next_piece()`, each row with the source's position where the next
  row's first piece was read: seeking there and packing again gives the same following rows."""
  buf: list[np.ndarray] = []
  used = 0
  while True:
    before = source.position()
    piece = source.next_piece()
    if piece is None:
      break
    if len(piece) > seq_len:
      raise ValueError(f"seq_len: a piece of {len(piece)} tokens exceeds {seq_len}")
    if used + len(piece) > seq_len:
      yield _row(buf, seq_len, bos_id), before
      buf, used = [], 0
    buf.append(piece)
    used += len(piece)
  if buf:
    yield _row(buf, seq_len, bos_id), source.position()


def _batches(rows: Iterator[tuple[dict, dict | None]], batch_size: int):
  """(batch, position after it) of batch_size rows; at the end of a finite pass the last batch
  is filled with padding rows (segment id 0, no loss), so no token is dropped."""
  while True:
    got, after = [], None
    for _ in range(batch_size):
      try:
        row, after = next(rows)
      except StopIteration:
        if not got:
          return
        row = {k: np.zeros_like(v) for k, v in got[0].items()}
      got.append(row)
    yield {k: np.stack([r[k] for r in got]) for k in got[0]}, after


class _Ahead:
  """Runs a generator in a daemon thread up to `depth` items ahead (tokenizing overlaps the
  train step); its exceptions surface in `next()`."""

  def __init__(self, gen, depth: int):
    self._q: queue.Queue = queue.Queue(depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._run, args=(gen,), daemon=True,
                                    name="coder_jax-data")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, gen):
    try:
      for item in gen:
        if not self._put(("item", item)):
          return
      self._put(("end", None))
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer
      self._put(("error", e))

  def __next__(self):
    if self._done:
      raise StopIteration
    kind, x = self._q.get()
    if kind == "item":
      return x
    self._done = True
    if kind == "error":
      raise x
    raise StopIteration

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
  # A tf.data iterator still running py_function work when the interpreter finalizes can hang
  # the exit for good; stopping it while Python is whole avoids that.
  for p in list(_OPEN):
    p.close()


class Pipeline:
  """Iterator over numpy batches for one host (shard `shard_index` of `num_shards`).

  start_batch: begin at that batch by reading the batches before it (slow; for a checkpoint use
  `position`). position: a `state()` saved with a checkpoint (one host's, or the {"hosts": [...]}
  of a multi-host save): continue from it in constant time. prefetch: batches made ahead in a
  background thread (0: on the caller's thread).
  """

  def __init__(self, cfg: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
               start_batch: int = 0, num_epochs: int | None = None, position: dict | None = None,
               prefetch: int = 2):
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index: must be in [0, {num_shards}), got {shard_index}")
    if start_batch < 0:
      raise ValueError(f"start_batch: must be >= 0, got {start_batch}")
    self.cfg, self.shard_index, self.num_shards = cfg, shard_index, num_shards
    self.batches = start_batch  # batches consumed, counting those a resume skips
    self.num_epochs = num_epochs
    self.prefetch = prefetch
    self.legacy = False         # replaying the SeqIO stream of a batch-count-only state
    self._position = None       # where the next batch's first row starts (None: not known yet)
    self._rows = None
    tok = os.path.abspath(cfg.tokenizer)  # the file, also when cfg names an HF model directory
    self.tokenizer_path = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
    _OPEN.add(self)
    if position is not None:
      self.seek(position)

  def seek(self, state: dict) -> None:
    """Continue from `state` (see the class); before the first batch only."""
    if self._rows is not None:
      raise RuntimeError("seek: the pipeline has already started; seek before the first batch")
    hosts = state.get("hosts")
    if hosts is not None:
      if len(hosts) != self.num_shards:
        raise ValueError(host_count_error(len(hosts), self.num_shards))
      state = hosts[self.shard_index]
    stream = state.get("stream")
    saved = state.get("num_shards")
    if stream is not None and saved is not None and int(saved) != self.num_shards:
      raise ValueError(host_count_error(int(saved), self.num_shards))
    self.batches = int(state.get("batches", 0))
    if stream is None:
      self._position = None
      self.legacy = self.batches > 0
      if self.legacy:
        print(f"note: the data position at batch {self.batches} is a batch count only (a "
              "checkpoint from before seekable data); replaying the earlier SeqIO stream to "
              "that batch: exact, but it takes as long as making those batches did. Later "
              "checkpoints of this run keep that stream.", file=sys.stderr, flush=True)
      return
    for name, want in (("seq_len", self.cfg.seq_len), ("seed", self.cfg.seed)):
      if name in stream and stream[name] != want:
        raise ValueError(f"data: the checkpoint's data position was made with {name}="
                         f"{stream[name]}, this run has {name}={want}; resume with the same "
                         f"{name} (or start a new stage with init_from_checkpoint)")
    self._position = {"pieces": int(stream["pieces"]), "tasks": dict(stream["tasks"])}

  def close(self) -> None:
    """Stops the work behind the stream; a later next() restarts it where it was."""
    rows, self._rows = self._rows, None
    if rows is not None:
      rows.close()

  def pieces(self):
    """The SeqIO stream of token pieces (legacy: FIM'd, EOS'd, split, shuffled, sampled)."""
    import seqio
    provider = self._provider()
    cfg = self.cfg
    ds = provider.get_dataset(
        sequence_length={"targets": cfg.seq_len}, split=cfg.split, shuffle=cfg.shuffle,
        num_epochs=self.num_epochs, seed=cfg.seed,
        shard_info=seqio.ShardInfo(self.shard_index, self.num_shards))
    return (ex["targets"] for ex in ds.prefetch(64).as_numpy_iterator())

  def _provider(self):
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
    return provider

  def source(self):
    """The seekable stream of token pieces for this shard (`stream.py`), at its start. With the
    stream's plan in the user cache (`stream_plan.py`) this imports no TensorFlow or SeqIO."""
    from coder_jax.data.fim import FimIds
    from coder_jax.data.stream import MixtureStream, RecordSplit, TaskStream
    from coder_jax.data.stream_plan import cached_plan, make_plan
    from coder_jax.data.tokenizer import TextEncoder
    cfg = self.cfg
    plan = cached_plan(cfg) or make_plan(cfg, self._provider())
    v = self.vocabulary = TextEncoder(cfg.tokenizer)
    common = dict(shard=self.shard_index, num_shards=self.num_shards, seed=cfg.seed,
                  shuffle=cfg.shuffle, seq_len=cfg.seq_len, encode=v.encode,
                  ids=FimIds(v.fim_begin_id, v.fim_hole_id, v.fim_end_id), eos_id=v.eos_id,
                  fim=cfg.fim, long_doc_min_tokens=cfg.long_doc_min_tokens,
                  long_doc_factor=cfg.long_doc_factor, num_epochs=self.num_epochs)
    streams = {name: TaskStream(name, RecordSplit(cfg.data_dir, t["filenames"],
                                                  t["shard_lengths"]), **common)
               for name, t in plan["tasks"].items()}
    return MixtureStream(streams, {name: t["rate"] for name, t in plan["tasks"].items()},
                         cfg.seed)

  def _open(self):
    if self.legacy:
      rows = ((r, None) for r in pack(self.pieces(), self.cfg.seq_len, self.vocabulary.bos_id))
      gen = _batches(rows, self.cfg.batch_size)
      skip = self.batches                 # deterministic stream: skipping is exact resumption
    else:
      src = self.source()
      if self._position is not None:
        src.seek(self._position)
      skip = 0 if self._position is not None else self.batches
      gen = _batches(tracked_rows(src, self.cfg.seq_len, self.vocabulary.bos_id),
                     self.cfg.batch_size)
      if self._position is None:
        self._position = src.position()
    for _ in range(skip):
      _, self._position = next(gen)
    return _Ahead(gen, self.prefetch) if self.prefetch > 0 else _Sync(gen)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._rows is None:
      self._rows = self._open()
    batch, self._position = next(self._rows)
    self.batches += 1
    return batch

  def state(self) -> dict:
    """JSON, saved with the training checkpoint; `Pipeline(cfg, position=state)` continues."""
    out = {"batches": self.batches, "shard_index": self.shard_index,
           "num_shards": self.num_shards, "seed": self.cfg.seed}
    if self.legacy:
      return out
    if self._position is None:   # start_batch given and nothing read yet: find where that is
      self._rows = self._open()
    return {**out, "stream": {"version": 2, "seq_len": self.cfg.seq_len, "seed": self.cfg.seed,
                              **self._position}}


class _Sync:
  def __init__(self, gen):
    self._gen = gen

  def __next__(self):
    return next(self._gen)

  def close(self):
    self._gen.close()


def host_count_error(saved: int, now: int) -> str:
  return (f"data: the checkpoint's data position is for {saved} hosts, this run has {now}; "
          f"each host reads its own shard of the corpus, so the stream cannot continue on "
          f"another number of hosts: resume with {saved} hosts, or start a new stage from the "
          "checkpoint (init_from_checkpoint) to read the data afresh")
