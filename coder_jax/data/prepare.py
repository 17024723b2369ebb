"""Dataset + tokenizer in one DATA_DIR, built on first use: what `python -m coder_jax.data build`
and the trainer call."""

from __future__ import annotations

import filecmp
import os
import shutil


def prepare(data_dir: str, sources=None, *, vocab_size: int = 8192, tokenizer: str | None = None,
            max_file_bytes: int = 1 << 20, validation_fraction: float = 0.01,
            tokenizer_docs: int = 2000, c_headers: bool = False) -> tuple[str, str]:
  """(dataset directory, tokenizer.json path). Sources default to the embedded corpus."""
  from coder_jax.data.builder import build
  from coder_jax.data.corpus import default_sources
  sources = sources or default_sources(include_c_headers=c_headers)
  dataset_dir, _ = build(sources, data_dir, max_file_bytes=max_file_bytes,
                         validation_fraction=validation_fraction)
  tok_path = os.path.join(data_dir, "tokenizer.json")
  if tokenizer:
    if not (os.path.exists(tok_path) and filecmp.cmp(tokenizer, tok_path, shallow=False)):
      shutil.copyfile(tokenizer, tok_path)
  elif not os.path.exists(tok_path):
    from coder_jax.data.tokenizer import train_tokenizer
    train_tokenizer(_texts(dataset_dir, tokenizer_docs), vocab_size, tok_path)
  return dataset_dir, tok_path


def _texts(dataset_dir, limit):
  """Up to `limit` training documents taken round-robin over the languages, so the tokenizer
  sees every language rather than the alphabetically first ones."""
  import tensorflow_datasets as tfds
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
      yield ex["text"].decode("utf-8")
      n += 1
      if n >= limit:
        return
