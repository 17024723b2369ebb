"""Byte-level BPE tokenizer with DeepSeek's special tokens, plus a SeqIO vocabulary.

Three layers:

* `train_tokenizer` / `load_tokenizer` work on plain `tokenizers.Tokenizer`
  objects (HF `tokenizer.json` format), so a tokenizer trained here and
  DeepSeek's released one are used the same way.
* `make_vocabulary(path)` wraps one in a `seqio.Vocabulary`. SeqIO pulls in
  TensorFlow, so the vocabulary class is built on first use and importing this
  module stays TF-free (the CLI and the packing code do not need TF).
* `main()` trains a tokenizer on source trees:
  `python -m coder_jax.data.tokenizer --source DIR --vocab_size N --out tokenizer.json`.

Id layout of tokenizers trained here: the six special tokens come FIRST, so
PAD=0 (SeqIO's PAD_ID), BOS=1, EOS=2, FIM_BEGIN=3, FIM_HOLE=4, FIM_END=5, then
the 256 byte symbols, then merges. DeepSeek's released vocabulary appends its
specials after the BPE merges (ids 100000+); nothing here depends on the
position, callers always look ids up by string.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from coder_jax.data.cuts import chunks

if TYPE_CHECKING:
  import seqio

# U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK, as DeepSeek spells them.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
PAD = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END)
# Training order: pad first so it lands on id 0, SeqIO's padding id.
TRAINED_SPECIAL_TOKENS = (PAD,) + SPECIAL_TOKENS

_NUM_BYTE_SYMBOLS = 256
# Longest text handed to the Rust tokenizer in one call (longer ones go in pieces, cuts.py):
# an encoding costs some 400 bytes per token, so this bounds one call to ~10 MB.
ENCODE_CHUNK_CHARS = 1 << 16


# --- Training and loading.


def _new_bpe(split_digits: bool) -> tokenizers.Tokenizer:
  """Empty byte-level BPE with DeepSeek's shape: no normalizer, no UNK."""
  tok = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if split_digits:
    # One token per digit keeps numbers compositional, as DeepSeek-Coder does.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  return tok


def min_vocab_size() -> int:
  """The smallest vocab_size `train_tokenizer` accepts."""
  return _NUM_BYTE_SYMBOLS + len(TRAINED_SPECIAL_TOKENS) + 1


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | None = None,
                    min_frequency: int = 2, *, split_digits: bool = True) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on `texts`; specials get ids 0..5 (see module docstring).

  Every byte is in the initial alphabet, so any string encodes without UNK and
  decodes back exactly. Writes `tokenizer.json` to `out_path` when given.
  """
  floor = min_vocab_size() - 1
  if vocab_size <= floor:
    raise ValueError(f"vocab_size={vocab_size} must be > {floor} "
                     f"(256 byte symbols + {len(TRAINED_SPECIAL_TOKENS)} special tokens)")
  tok = _new_bpe(split_digits)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      special_tokens=[tokenizers.AddedToken(t, special=True, normalized=False)
                      for t in TRAINED_SPECIAL_TOKENS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  got = [tok.token_to_id(t) for t in TRAINED_SPECIAL_TOKENS]
  if got != list(range(len(TRAINED_SPECIAL_TOKENS))):
    # The layout is documented and relied on by configs; fail loudly if the library changes it.
    raise RuntimeError(f"unexpected special token ids after training: {got}")
  if out_path:
    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    tok.save(out_path)
  return tok


def resolve_path(path: str) -> str:
  """The tokenizer.json a path names: the file, or the one in an HF model directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    # Accept an HF model directory as well as the file itself.
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  return path


def _check_specials(tok: tokenizers.Tokenizer, where: str) -> None:
  for t in SPECIAL_TOKENS:
    tid = tok.token_to_id(t)
    if tid is None:
      raise ValueError(f"tokenizer {where} lacks special token {t!r}")
    # A vocab entry that is not an added token would be split by BPE in text.
    ids = tok.encode(t, add_special_tokens=False).ids
    if ids != [tid]:
      raise ValueError(f"tokenizer {where}: special token {t!r} (id {tid}) "
                       f"is not an atomic added token; it encodes to {ids}")


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Loads a `tokenizer.json` (or a directory holding one) and checks DeepSeek's specials."""
  path = resolve_path(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
    spec = json.loads(raw.decode("utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a tokenizer.json: {e}") from e
  if not isinstance(spec, dict) or "model" not in spec:
    raise ValueError(f"{path} is not a tokenizer.json: no 'model' entry")
  try:
    tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
  except Exception as e:  # the Rust side raises a bare Exception
    raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
  _check_specials(tok, path)
  return tok


@functools.lru_cache(maxsize=16)
def _cached_load(path: str, mtime_ns: int, size: int,
                 text_mode: bool) -> tuple[tokenizers.Tokenizer, str]:
  """Shares one Tokenizer per file version between vocabulary copies (tf.data deep-copies).

  text_mode: document text never yields control ids, so a literal "<｜end▁of▁sentence｜>" in
  source code is encoded as ordinary bytes; BOS/EOS/FIM markers are inserted by id.
  """
  del mtime_ns, size  # cache key only: a rewritten file gets reloaded
  tok = load_tokenizer(path)
  # Hash the re-serialized tokenizer so formatting differences between files do not matter.
  digest = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
  tok.encode_special_tokens = text_mode
  return tok, digest


def _load_with_digest(path: str, text_mode: bool = False) -> tuple[tokenizers.Tokenizer, str]:
  path = os.path.abspath(resolve_path(path))
  st = os.stat(path)
  return _cached_load(path, st.st_mtime_ns, st.st_size, text_mode)


def encode_text(tok: tokenizers.Tokenizer, s: str) -> list[int]:
  """Ids of document text, no special tokens added; in pieces, since one encoding of a whole
  multi-megabyte text would take gigabytes (cuts.py)."""
  if len(s) <= ENCODE_CHUNK_CHARS:
    return tok.encode(s, add_special_tokens=False).ids
  ids: list[int] = []
  for piece in chunks(s, ENCODE_CHUNK_CHARS):
    ids += tok.encode(piece, add_special_tokens=False).ids
  return ids


class TextEncoder:
  """A tokenizer.json as the seekable data stream uses it, without TensorFlow: `encode` and the
  special ids exactly as the SeqIO vocabulary below gives them (document text never yields a
  control id)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(resolve_path(path))
    self.tokenizer, _ = _load_with_digest(self.path, text_mode=True)
    ids = [self.tokenizer.token_to_id(t) for t in (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END)]
    self.bos_id, self.eos_id, self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids

  def encode(self, s: str) -> list[int]:
    return encode_text(self.tokenizer, s)


# --- SeqIO vocabulary (class built lazily so this module does not import TF).

_VOCAB_CLASS: type | None = None


def _vocabulary_class() -> type:
  """Defines HFTokenizerVocabulary on first call; importing seqio imports TensorFlow."""
  global _VOCAB_CLASS
  if _VOCAB_CLASS is not None:
    return _VOCAB_CLASS
  import seqio
  import tensorflow as tf

  class HFTokenizerVocabulary(seqio.Vocabulary):
    """seqio.Vocabulary over a HF `tokenizer.json` with DeepSeek's special tokens.

    `encode` adds no special tokens; `decode` keeps them visible (FIM markers
    included) and does no whitespace cleanup, so text round-trips exactly.
    SeqIO semantics kept: `decode`/`decode_tf` stop after the first EOS.
    The pad token, when the vocabulary has one, is a control id that decodes
    to nothing (as in SentencePiece), because SeqIO pads batches and the tail
    after EOS with it. `pad_id` falls back to 0 when there is no pad token,
    and id 0 is then ordinary text, so it is not dropped.
    """

    def __init__(self, path: str):
      self._path = os.path.abspath(resolve_path(path))
      self._tok: tokenizers.Tokenizer | None = None
      self._digest: str | None = None
      super().__init__(extra_ids=0)
      self._ensure_loaded()  # fail at construction, not deep inside a tf.data map

    # Pickling/deepcopy: carry the path only; the Rust tokenizer is rebuilt lazily.
    def __getstate__(self) -> dict[str, Any]:
      state = self.__dict__.copy()
      state["_tok"] = None
      return state

    def __setstate__(self, state: dict[str, Any]) -> None:
      self.__dict__.update(state)

    def _ensure_loaded(self) -> tokenizers.Tokenizer:
      if self._tok is None:
        self._tok, self._digest = _load_with_digest(self._path, text_mode=True)
      return self._tok

    @property
    def path(self) -> str:
      return self._path

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
      return self._ensure_loaded()

    def _id(self, token: str) -> int | None:
      return self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int:
      return self._id(BOS)

    @property
    def eos_id(self) -> int:
      return self._id(EOS)

    @property
    def pad_id(self) -> int:
      pid = self._id(PAD)
      return 0 if pid is None else pid

    @property
    def unk_id(self) -> None:
      return None

    @property
    def fim_begin_id(self) -> int:
      return self._id(FIM_BEGIN)

    @property
    def fim_hole_id(self) -> int:
      return self._id(FIM_HOLE)

    @property
    def fim_end_id(self) -> int:
      return self._id(FIM_END)

    @property
    def _base_vocab_size(self) -> int:
      return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
      return encode_text(self.tokenizer, s)

    def _clean(self, ids: Sequence[int]) -> list[int]:
      """Validates ids, cuts after the first EOS and drops pad control ids."""
      n = self._base_vocab_size
      eos = self.eos_id
      drop = self._id(PAD)
      out = []
      for i in ids:
        i = int(i)
        if i < 0 or i >= n:
          raise ValueError(f"token id {i} outside vocabulary of size {n} ({self._path})")
        if i == drop:
          continue
        out.append(i)
        if i == eos:
          break
      return out

    def _decode(self, ids: Sequence[int]) -> str:
      return self.tokenizer.decode(self._clean(ids), skip_special_tokens=False)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
      """Scalar string -> int32 [n]; rank-1 strings -> ragged int32 [batch, None]."""
      s = tf.convert_to_tensor(s, dtype=tf.string)
      rank = s.shape.rank
      if rank == 0:
        # Return an array: py_function would read a bare list as a list of outputs.
        ids = tf.py_function(
            lambda x: np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32), [s], tf.int32)
        ids.set_shape([None])
        return ids
      if rank != 1:
        raise ValueError(f"encode_tf expects a scalar or 1-D string tensor, got rank {rank}")

      def encode_batch(x: tf.Tensor) -> tuple[np.ndarray, np.ndarray]:
        texts = [b.decode("utf-8") for b in x.numpy().tolist()]
        if any(len(t) > ENCODE_CHUNK_CHARS for t in texts):
          encs = [self._encode(t) for t in texts]
        else:
          encs = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        flat = np.asarray([i for e in encs for i in e], np.int32)
        return flat, np.asarray([len(e) for e in encs], np.int32)

      flat, lengths = tf.py_function(encode_batch, [s], [tf.int32, tf.int32])
      flat.set_shape([None])
      lengths.set_shape(s.shape)
      return tf.RaggedTensor.from_row_lengths(flat, tf.cast(lengths, tf.int64))

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
      """int [n] -> scalar string; int [..., n] -> strings of shape [...]."""
      ids = tf.convert_to_tensor(ids)
      rank = ids.shape.rank
      if rank is None or rank == 0:
        raise ValueError(f"decode_tf expects ids of rank >= 1, got rank {rank}")

      def decode_rows(x: tf.Tensor) -> tf.Tensor:
        arr = x.numpy()
        rows = arr.reshape(int(np.prod(arr.shape[:-1], dtype=np.int64)), arr.shape[-1])
        return tf.constant([self._decode(r.tolist()).encode("utf-8") for r in rows],
                           dtype=tf.string)

      out = tf.py_function(decode_rows, [ids], tf.string)
      out = tf.reshape(out, tf.shape(ids)[:-1])
      out.set_shape(ids.shape[:-1])
      return out

    def __eq__(self, other: object) -> bool:
      # Content, not path: SeqIO compares the vocabularies of mixed tasks.
      if not isinstance(other, HFTokenizerVocabulary):
        return False
      self._ensure_loaded()
      other._ensure_loaded()
      return self._digest == other._digest

    def __hash__(self) -> int:
      self._ensure_loaded()
      return hash(self._digest)

    def __repr__(self) -> str:
      return f"HFTokenizerVocabulary({self._path!r}, vocab_size={self.vocab_size})"

  # Make pickle find the class as `coder_jax.data.tokenizer.HFTokenizerVocabulary`
  # (resolved through the module __getattr__ below).
  HFTokenizerVocabulary.__module__ = __name__
  HFTokenizerVocabulary.__qualname__ = "HFTokenizerVocabulary"
  _VOCAB_CLASS = HFTokenizerVocabulary
  return HFTokenizerVocabulary


def make_vocabulary(path: str) -> "seqio.Vocabulary":
  """Returns an HFTokenizerVocabulary for `path` (tokenizer.json or a dir holding one)."""
  return _vocabulary_class()(path)


def __getattr__(name: str) -> Any:
  # PEP 562: `tokenizer.HFTokenizerVocabulary` builds the class (and imports TF) on demand.
  if name == "HFTokenizerVocabulary":
    return _vocabulary_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- CLI.

_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv",
                        ".mypy_cache", ".pytest_cache", ".tox"})
_MAX_FILE_BYTES = 1 << 20  # bigger files are almost always data, not code


def iter_text_files(roots: Sequence[str], max_docs: int | None = None) -> Iterable[str]:
  """Yields the contents of UTF-8 text files under `roots` in sorted order.

  Binary (NUL byte), non-UTF-8, unreadable and oversized files are skipped
  silently; a root may also be a single file.
  """
  count = 0
  for root in roots:
    if os.path.isfile(root):
      paths: Iterable[str] = [root]
    else:
      paths = _walk_sorted(root)
    for p in paths:
      if max_docs is not None and count >= max_docs:
        return
      text = _read_text(p)
      if text is None:
        continue
      count += 1
      yield text


def _walk_sorted(root: str) -> Iterable[str]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      yield os.path.join(dirpath, name)


def _read_text(path: str) -> str | None:
  try:
    if os.path.getsize(path) > _MAX_FILE_BYTES:
      return None
    with open(path, "rb") as f:
      data = f.read()
    if b"\x00" in data:
      return None
    return data.decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return None


def chars_per_token(tok: tokenizers.Tokenizer, texts: Sequence[str]) -> float:
  """Compression of `tok` on `texts`: total characters / total tokens."""
  encs = tok.encode_batch(list(texts), add_special_tokens=False)
  n_tokens = sum(len(e.ids) for e in encs)
  return sum(len(t) for t in texts) / max(n_tokens, 1)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m coder_jax.data.tokenizer",
      description="Train a DeepSeek-style byte-level BPE tokenizer.json on source trees.")
  parser.add_argument("--source", action="append", required=True,
                      help="directory (or file) to read; repeatable")
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--out", required=True, help="output tokenizer.json path")
  parser.add_argument("--max_docs", type=int, default=None, help="use at most this many files")
  parser.add_argument("--min_frequency", type=int, default=2)
  parser.add_argument("--no_split_digits", action="store_true",
                      help="let BPE merge digit runs instead of one token per digit")
  args = parser.parse_args(argv)
  parent = os.path.dirname(os.path.abspath(args.out))
  if os.path.isdir(args.out) or (os.path.exists(parent) and not os.path.isdir(parent)):
    parser.error(f"--out: {args.out} cannot be written as a file (give a tokenizer.json path)")
  missing = [s for s in args.source if not os.path.exists(s)]
  if missing:
    parser.error(f"--source: {', '.join(missing)} does not exist")

  texts = list(iter_text_files(args.source, args.max_docs))
  if not texts:
    parser.error(f"no readable UTF-8 text files under {args.source}")
  from coder_jax.cli import exit_status
  return exit_status(lambda _: _train_and_report(texts, args))


def _train_and_report(texts: list[str], args) -> None:
  from coder_jax.cli import USER_ERRORS
  try:
    tok = train_tokenizer(texts, args.vocab_size, args.out, args.min_frequency,
                          split_digits=not args.no_split_digits)
  except USER_ERRORS:
    raise
  except Exception as e:  # the Rust side reports a failed save as a bare Exception
    raise OSError(f"--out: {args.out}: {e}") from None
  ids = {t: tok.token_to_id(t) for t in TRAINED_SPECIAL_TOKENS}
  print(f"trained on {len(texts)} files ({sum(map(len, texts))} chars) -> {args.out}")
  print(f"vocab size: {tok.get_vocab_size(with_added_tokens=True)}")
  print("special token ids: " + ", ".join(f"{t}={i}" for t, i in ids.items()))
  print(f"compression: {chars_per_token(tok, texts):.3f} chars/token on the training sample")


if __name__ == "__main__":
  from coder_jax.cli import quiet_native_logs
  quiet_native_logs()
  sys.exit(main())
