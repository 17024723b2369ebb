"""Dataset + tokenizer in one DATA_DIR: `prepare` builds (what `python -m coder_jax.data build`
calls), `for_training` picks what a run reads and builds only what it was told to (CodeData)."""

from __future__ import annotations

import filecmp
import os
import shutil

from coder_jax.data.corpus import MAX_DOC_CHARS
from coder_jax.data.layout import (STATS_NAME, TFDS_NAME, TOKENIZER_NAME, corpora, find_dataset,
                                   tokenizer_of)


def prepare(data_dir: str, sources=None, *, vocab_size: int = 8192, tokenizer: str | None = None,
            max_file_bytes: int = 1 << 20, validation_fraction: float = 0.01,
            tokenizer_docs: int = 2000, c_headers: bool = False,
            max_doc_chars: int = MAX_DOC_CHARS) -> tuple[str, str]:
  """(dataset directory, tokenizer.json path). Sources default to the embedded corpus.

  tokenizer: a file to use; copied to DATA_DIR/tokenizer.json when DATA_DIR has none. Without
  it, DATA_DIR/tokenizer.json, trained on the corpus when absent (the first build there).
  """
  from coder_jax.data.builder import build
  from coder_jax.data.corpus import default_sources
  sources = sources or default_sources(include_c_headers=c_headers)
  dataset_dir, _ = build(sources, data_dir, max_file_bytes=max_file_bytes,
                         validation_fraction=validation_fraction, max_doc_chars=max_doc_chars)
  return dataset_dir, _tokenizer(data_dir, dataset_dir, tokenizer, vocab_size, tokenizer_docs)


def for_training(data_dir: str, sources=None, dataset: str | None = None, *, vocab_size: int,
                 tokenizer: str | None = None) -> tuple[str, str]:
  """(dataset directory, tokenizer.json path) that a run trains on. Never guesses:

  - sources given: that corpus (built on first use, beside any others);
  - dataset given: that built corpus, by name (`data build` prints it);
  - DATA_DIR a dataset directory itself (DATA_DIR/code_corpus/NAME/1.0.0): that one;
  - neither: DATA_DIR's only built corpus; several are an error naming them; none builds the
    embedded default corpus, but only into a new or empty DATA_DIR, never beside a user's files.
  """
  if sources and dataset:
    raise ValueError("CodeData.sources and CodeData.dataset: both set; set one of them")
  if sources:
    return prepare(data_dir, list(sources), vocab_size=vocab_size, tokenizer=tokenizer)
  if dataset or corpora(data_dir) or os.path.isfile(os.path.join(data_dir, STATS_NAME)):
    dataset_dir = find_dataset(data_dir, dataset)
    home = os.path.dirname(tokenizer_of(dataset_dir))  # DATA_DIR even when given the dataset's
    return dataset_dir, _tokenizer(home, dataset_dir, tokenizer, vocab_size, 2000)
  _check_new(data_dir)
  return prepare(data_dir, None, vocab_size=vocab_size, tokenizer=tokenizer)


def _check_new(data_dir: str) -> None:
  """The default corpus goes only into a DATA_DIR holding nothing but a tokenizer.json, TFDS's
  own files and an unfinished build of that corpus (an interrupted first run)."""
  from coder_jax.data.builder import config_name
  from coder_jax.data.corpus import default_sources
  if not os.path.exists(data_dir):
    return
  if not os.path.isdir(data_dir):
    raise ValueError(f"DATA_DIR: {data_dir} exists and is not a directory")
  others = sorted(set(os.listdir(data_dir)) - {TFDS_NAME, TOKENIZER_NAME, "downloads"})
  tfds_dir = os.path.join(data_dir, TFDS_NAME)
  if os.path.isdir(tfds_dir):
    others += [os.path.join(TFDS_NAME, e) for e in sorted(os.listdir(tfds_dir))
               if e not in (config_name(default_sources()), ".config")]  # .config: TFDS's
  if others:
    shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    raise ValueError(f"DATA_DIR: {data_dir} holds no built corpus but is not empty ({shown}); "
                     "the embedded default corpus is built only into a new or empty directory: "
                     "point DATA_DIR at a built corpus or an empty directory, or set "
                     "CodeData.sources")


def _tokenizer(data_dir, dataset_dir, tokenizer, vocab_size, tokenizer_docs) -> str:
  tok_path = os.path.join(data_dir, TOKENIZER_NAME)
  if tokenizer:
    from coder_jax.data.tokenizer import resolve_path
    tokenizer = resolve_path(tokenizer)  # a file, or an HF model directory holding one
    if not os.path.exists(tok_path):  # so `data show` and eval find it without being told
      shutil.copyfile(tokenizer, tok_path)
    elif not filecmp.cmp(tokenizer, tok_path, shallow=False):
      # DATA_DIR's own may belong to other runs: use the given one, leave that one alone.
      return os.path.abspath(tokenizer)
  elif not os.path.exists(tok_path):
    from coder_jax.data.tokenizer import train_tokenizer
    train_tokenizer(_texts(dataset_dir, tokenizer_docs), vocab_size, tok_path)
  return os.path.abspath(tok_path)


def _texts(dataset_dir, limit):
  """Up to `limit` training documents taken round-robin over the languages, so the tokenizer
  sees every language rather than the alphabetically first ones. Long ones go in pieces cut at
  pre-tokenizer boundaries (cuts.py), which the trainer's word counts cannot tell from the whole
  but which keep its buffer of texts small."""
  import tensorflow_datasets as tfds
  from coder_jax.data.cuts import chunks
  from coder_jax.data.tokenizer import ENCODE_CHUNK_CHARS
  builder = tfds.builder_from_directory(dataset_dir)
  iters = [builder.as_dataset(split=s).as_numpy_iterator()
           for s in sorted(s for s in builder.info.splits if s.startswith("train_"))]
  n = 0
  while iters and n < limit:
    for it in list(iters):
      ex = next(it, None)
      if ex is None:
        iters.remove(it)
        continue
      yield from chunks(ex["text"].decode("utf-8"), ENCODE_CHUNK_CHARS)
      n += 1
      if n >= limit:
        return
