"""The code mixture as a stream of token pieces whose position is a few integers per language.

Replaying a stream to resume it tokenizes and packs every consumed document again (hours at step
100,000). Here every random choice is drawn from a generator seeded by the position itself, so a
saved position is reached directly:
- documents: a language's documents in this host's shard (global index = host mod hosts) are read
  in the order of a permutation drawn from (seed, language, epoch); TFRecord files are read by
  record offset (found by walking the record headers once per file), so element k of an epoch
  costs one read wherever k is;
- each document becomes its FIM layout + EOS (`fim.py`, a function of (seed, key)) cut into
  pieces of at most seq_len tokens;
- long-document upsampling: an epoch runs over `factor` copies of every document; a copy after
  the first yields its pieces only for a document of at least `min_tokens` tokens, so the
  copies land at independent places of the epoch instead of next to each other;
- the mixture draws piece i's language with probability proportional to its rate from a
  generator seeded by (seed, i // BLOCK); a language that runs out (finite epochs) leaves the
  draw and the same number picks among the rest.

The position, {"pieces": i, "tasks": {language: [epoch, element, pieces taken]}}, is JSON.
Seeking reads and tokenizes at most the one document in progress per language.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np

from coder_jax.data.fim import FimConfig, FimIds, fim_tokens

BLOCK = 4096          # mixture draws per generator
_HEADER = 12          # TFRecord: uint64 length + uint32 masked crc, then data + uint32 crc
UPSAMPLE_SLACK = 16   # tokens a document can have beyond its UTF-8 bytes (specials, a prefix)


def check_file_format(dataset_dir: str, file_format: str) -> None:
  if "tfrecord" not in file_format.lower():
    raise ValueError(f"data: {dataset_dir} stores {file_format} files; the seekable stream "
                     "reads TFRecord (rebuild the corpus with `python -m coder_jax.data build`)")


class RecordSplit:
  """Random access to the examples of one TFDS split stored as TFRecord files (its `filenames`
  in DATASET_DIR, with `shard_lengths` records each); no TensorFlow needed."""

  def __init__(self, dataset_dir: str, filenames: Sequence[str], shard_lengths: Sequence[int]):
    self.files = [os.path.join(dataset_dir, f) for f in filenames]
    self.starts = np.cumsum([0] + [int(n) for n in shard_lengths])
    self._offsets: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _index(self, f: int) -> np.ndarray:
    if f not in self._offsets:
      offsets, at = [], 0
      with open(self.files[f], "rb") as fh:
        while True:
          head = fh.read(8)
          if len(head) < 8:
            break
          offsets.append(at)
          at += _HEADER + struct.unpack("<Q", head)[0] + 4
          fh.seek(at)
      want = int(self.starts[f + 1] - self.starts[f])
      if len(offsets) != want:
        raise ValueError(f"data: {self.files[f]} holds {len(offsets)} records, its dataset_info "
                         f"says {want}; the corpus is damaged, rebuild it")
      self._offsets[f] = np.asarray(offsets, np.int64)
    return self._offsets[f]

  def get(self, i: int) -> dict[str, bytes]:
    f = int(np.searchsorted(self.starts, i, side="right")) - 1
    at = int(self._index(f)[i - self.starts[f]])
    with open(self.files[f], "rb") as fh:
      fh.seek(at)
      n = struct.unpack("<Q", fh.read(8))[0]
      fh.seek(at + _HEADER)
      data = fh.read(n)
    return example_bytes(data)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[i]
    i += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, i
    shift += 7


def _fields(buf: bytes):
  """(field number, wire type, value) of each field of a serialized protobuf message; the value
  of a length-delimited field is its bytes."""
  i, n = 0, len(buf)
  while i < n:
    key, i = _varint(buf, i)
    wire = key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, i = buf[i:i + size], i + size
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    else:
      raise ValueError(f"data: a record is not a tf.train.Example (wire type {wire})")
    yield key >> 3, wire, value


def example_bytes(data: bytes) -> dict[str, bytes]:
  """The first value of each bytes feature of a serialized tf.train.Example (Example.features
  = 1; Features.feature = 1, a map entry of key = 1 and Feature = 2; Feature.bytes_list = 1;
  BytesList.value = 1), read without TensorFlow."""
  out = {}
  for num, wire, features in _fields(data):
    if num != 1 or wire != 2:
      continue
    for num2, wire2, entry in _fields(features):
      if num2 != 1 or wire2 != 2:
        continue
      fields = {n: v for n, w, v in _fields(entry) if w == 2}
      if 1 not in fields or 2 not in fields:
        continue
      for kind, wire3, values in _fields(fields[2]):
        if kind == 1 and wire3 == 2:
          first = next((v for n, w, v in _fields(values) if n == 1 and w == 2), None)
          if first is not None:
            out[fields[1].decode("utf-8")] = first
  return out


class TaskStream:
  """One language's pieces on this host; position [epoch, element, pieces taken from it]."""

  def __init__(self, name: str, records: RecordSplit, *, shard: int, num_shards: int,
               seed: int, shuffle: bool, seq_len: int, encode, ids: FimIds, eos_id: int,
               fim: FimConfig, long_doc_min_tokens: int = 0, long_doc_factor: int = 1,
               num_epochs: int | None = None):
    self.name, self.records = name, records
    self.docs = np.arange(shard, len(records), num_shards, dtype=np.int64)
    self.copies = long_doc_factor if long_doc_factor > 1 and long_doc_min_tokens > 0 else 1
    self.min_tokens = long_doc_min_tokens
    self.size = len(self.docs) * self.copies      # elements per epoch
    self.seed, self.shuffle, self.seq_len = seed, shuffle, seq_len
    self.encode, self.ids, self.eos_id, self.fim = encode, ids, eos_id, fim
    self.num_epochs = num_epochs
    self._salt = zlib.crc32(name.encode())
    self.seek([0, 0, 0])

  def position(self) -> list[int]:
    return [self.epoch, self.element, self.taken]

  def seek(self, pos) -> None:
    epoch, element, taken = (int(x) for x in pos)
    if min(epoch, element, taken) < 0 or element > max(self.size, 0):
      raise ValueError(f"data: position {list(pos)} of {self.name} is outside its "
                       f"{self.size} elements per epoch (another corpus or shard?)")
    self.epoch, self.element, self.taken = epoch, element, taken
    self._pieces = None

  def exhausted(self) -> bool:
    return self.size == 0 or (self.num_epochs is not None and self.epoch >= self.num_epochs)

  def _order(self) -> np.ndarray:
    if getattr(self, "_order_epoch", None) != self.epoch:
      self._order_epoch = self.epoch
      self._order_cache = (np.random.default_rng([self.seed, self._salt, self.epoch])
                           .permutation(self.size) if self.shuffle else np.arange(self.size))
    return self._order_cache

  def _load(self) -> list[np.ndarray]:
    v = int(self._order()[self.element])
    doc, copy = self.docs[v % len(self.docs)], v // len(self.docs)
    ex = self.records.get(int(doc))
    if copy and len(ex["text"]) + UPSAMPLE_SLACK < self.min_tokens:
      return []   # too short to be upsampled, known without tokenizing
    toks = fim_tokens(ex["text"].decode("utf-8"), ex["key"].decode("utf-8"), self.fim, self.ids,
                      self.encode)
    toks.append(self.eos_id)
    if copy and len(toks) < self.min_tokens:
      return []
    a = np.asarray(toks, np.int32)
    return [a[i:i + self.seq_len] for i in range(0, len(a), self.seq_len)]

  def next_piece(self) -> np.ndarray | None:
    while not self.exhausted():
      if self._pieces is None:
        self._pieces = self._load()
      if self.taken < len(self._pieces):
        self.taken += 1
        return self._pieces[self.taken - 1]
      self._pieces, self.taken, self.element = None, 0, self.element + 1
      if self.element >= self.size:
        self.epoch, self.element = self.epoch + 1, 0
    return None


class MixtureStream:
  """Pieces drawn from TaskStreams by rate; `position()` / `seek()` as the module says."""

  def __init__(self, tasks: dict[str, TaskStream], rates: dict[str, float], seed: int):
    self.tasks = {n: t for n, t in sorted(tasks.items()) if rates.get(n, 0) > 0}
    self.rates = {n: float(rates[n]) for n in self.tasks}
    self.seed = seed
    self.count = 0
    self._block = (None, None)

  def position(self) -> dict:
    return {"pieces": self.count,
            "tasks": {n: t.position() for n, t in self.tasks.items() if any(t.position())}}

  def seek(self, pos: dict) -> None:
    unknown = sorted(set(pos["tasks"]) - set(self.tasks))
    if unknown:
      raise ValueError(f"data: the saved position reads {unknown[0]}, which this run's mixture "
                       f"does not ({', '.join(self.tasks)}); resume with the same data settings")
    self.count = int(pos["pieces"])
    for n, t in self.tasks.items():
      t.seek(pos["tasks"].get(n, [0, 0, 0]))

  def _uniform(self, i: int) -> float:
    b = i // BLOCK
    if self._block[0] != b:
      self._block = (b, np.random.default_rng([self.seed, 0x6D6978, b]).random(BLOCK))
    return float(self._block[1][i % BLOCK])

  def next_piece(self) -> np.ndarray | None:
    u = self._uniform(self.count)
    self.count += 1
    active = [n for n, t in self.tasks.items() if not t.exhausted()]
    while active:
      w = np.cumsum([self.rates[n] for n in active])
      k = min(int(np.searchsorted(w / w[-1], u, side="right")), len(active) - 1)
      piece = self.tasks[active[k]].next_piece()
      if piece is not None:
        return piece
      active.pop(k)   # ran out just now; the same draw picks among the others
    return None
