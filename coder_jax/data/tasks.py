"""SeqIO tasks (one per language) and the code mixture over a built corpus.

Preprocessors, in order: FIM + tokenize (per document, `fim.py`), EOS, optional long-document
upsampling, split into pieces of at most the sequence length (so packing drops no token). The
registered mixture tells the data pipeline which languages a split has and their mixing rates
(`cached_token_rates`); training reads the pieces through the seekable stream (`stream.py`),
which applies the same steps document by document, and packs them itself (`pipeline.pack`,
next-fit in numpy). The tf.data stream of these tasks serves the replay of checkpoints from
before seekable data. TensorFlow and SeqIO are imported here only, never by the model.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import seqio
import tensorflow as tf

from coder_jax.data.fim import FimConfig, FimIds, fim_tokens
from coder_jax.data.layout import STATS_NAME
from coder_jax.data.tokenizer import make_vocabulary


def safe_name(lang: str) -> str:
  """A language as TFDS split names and SeqIO task names accept it (word characters only)."""
  return "".join(c if c.isalnum() else "_" for c in lang)


def language_split(split: str, lang: str) -> str:
  """TFDS split holding one language."""
  return f"{split}_{safe_name(lang)}"


def fim_tokenize(dataset, output_features, fim: FimConfig):
  """{'text', 'key'} -> {'targets': int32 ids in the document's FIM layout}."""
  vocab = output_features["targets"].vocabulary
  ids = FimIds(vocab.fim_begin_id, vocab.fim_hole_id, vocab.fim_end_id)

  def py(text, key):
    out = fim_tokens(text.numpy().decode("utf-8"), key.numpy().decode("utf-8"), fim, ids,
                     vocab.encode)
    return np.asarray(out, np.int32)

  def fn(ex):
    t = tf.py_function(py, [ex["text"], ex["key"]], tf.int32)
    t.set_shape([None])
    return {"targets": t}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def upsample_long_documents(dataset, min_tokens: int = 0, factor: int = 1):
  """Repeat every document of at least `min_tokens` tokens `factor` times (long-context data)."""
  if factor <= 1 or min_tokens <= 0:
    return dataset

  def fn(ex):
    times = tf.where(tf.size(ex["targets"]) >= min_tokens, factor, 1)
    return tf.data.Dataset.from_tensors(ex).repeat(tf.cast(times, tf.int64))

  return dataset.flat_map(fn)


def split_to_length(dataset, sequence_length):
  """Cut each token sequence into pieces of at most sequence_length['targets'] tokens."""
  n = sequence_length["targets"]

  def fn(ex):
    t = ex["targets"]
    size = tf.size(t)
    lengths = tf.minimum(n, size - tf.range(0, size, n))
    return tf.data.Dataset.from_tensor_slices(
        {"targets": tf.RaggedTensor.from_row_lengths(t, lengths)})

  return dataset.flat_map(fn).map(lambda ex: {"targets": ex["targets"]})


def register_code_tasks(data_dir: str, tokenizer_path: str, *, fim: FimConfig = FimConfig(),
                        rates: dict[str, float] | None = None, prefix: str = "code",
                        long_doc_min_tokens: int = 0, long_doc_factor: int = 1,
                        rate_split: str = "train") -> str:
  """Register `{prefix}_{lang}` tasks and the `{prefix}_mixture`; returns the mixture name.

  data_dir: the TFDS dataset directory written by `coder_jax.data build` (holds
  build_stats.json). rates: language -> mixing rate; default proportional to the tokens of
  `rate_split` (characters per language divided by that language's characters-per-token on a
  sample of its documents). A language whose data runs out (or that a host's shard lacks) drops
  out of the sampling instead of ending the stream.
  """
  stats = load_build_stats(data_dir)
  vocab = make_vocabulary(tokenizer_path)
  features = {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}
  langs = sorted(l for l, c in stats["per_language"].items() if c["documents"])
  have = sorted(s for s, per in stats["per_split_language"].items() if per)
  if rate_split not in have:
    raise ValueError(f"split: this corpus has no {rate_split!r} data (it has: "
                     f"{', '.join(have) or 'none'})")
  if rates is None:
    rates = cached_token_rates(data_dir, stats, vocab, langs, tokenizer_path, split=rate_split)
  else:
    unknown = sorted(set(rates) - set(langs))
    if unknown:
      raise ValueError(f"rates: {unknown} are not languages of this corpus ({', '.join(langs)})")
  if not sum(max(float(rates.get(l, 0.0)), 0.0) for l in langs) > 0:
    raise ValueError(f"rates: no language has a positive rate (split {rate_split!r})")
  preprocessors = [
      functools.partial(fim_tokenize, fim=fim),
      seqio.preprocessors.append_eos,
      functools.partial(upsample_long_documents, min_tokens=long_doc_min_tokens,
                        factor=long_doc_factor),
      split_to_length,
  ]
  clash = {safe_name(l) for l in langs if sum(safe_name(m) == safe_name(l) for m in langs) > 1}
  if clash:
    raise ValueError(f"languages: {sorted(clash)} stand for more than one language label")
  names = []
  for lang in langs:
    name = f"{prefix}_{safe_name(lang)}"
    splits = {s: language_split(s, lang) for s in ("train", "validation")
              if stats["per_split_language"].get(s, {}).get(lang)}
    for reg in (seqio.TaskRegistry, seqio.MixtureRegistry):
      if name in reg.names():
        reg.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.TfdsDataSource(tfds_data_dir=data_dir, splits=splits, read_only=True),
        preprocessors=preprocessors, output_features=features)
    names.append(name)
  mixture = f"{prefix}_mixture"
  if mixture in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(
      mixture, [(n, float(rates.get(l, 0.0))) for n, l in zip(names, langs)],
      sample_fn=functools.partial(tf.data.Dataset.sample_from_datasets,
                                  stop_on_empty_dataset=False))
  return mixture


def load_build_stats(data_dir: str) -> dict:
  path = os.path.join(data_dir, STATS_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing; build the corpus with `python -m coder_jax.data "
                            "build --source PATH --out DATA_DIR` first")
  with open(path) as fh:
    return json.load(fh)


def cached_token_rates(data_dir, stats, vocab, langs, tokenizer_path: str,
                       split: str = "train") -> dict[str, float]:
  """`token_rates`, kept per (corpus, tokenizer, split) in the user's cache directory
  ($XDG_CACHE_HOME or ~/.cache, then coder_jax/token_rates/; reading a DATA_DIR never writes
  into it): estimating them tokenizes 64 documents per language, the largest part of a start or
  resume. JSON keeps floats exactly, so a cached value equals a fresh one."""
  from coder_jax.data import usercache
  tok = os.path.abspath(tokenizer_path)
  tok = os.path.join(tok, "tokenizer.json") if os.path.isdir(tok) else tok
  path = usercache.entry_path("token_rates", (os.path.abspath(data_dir), split, ",".join(langs)),
                              (tok, os.path.join(data_dir, STATS_NAME)))
  rates = usercache.read(path)
  if rates is None:
    rates = token_rates(data_dir, stats, vocab, langs, split=split)
    usercache.write(path, rates)
  return rates


def token_rates(data_dir, stats, vocab, langs, sample_docs: int = 64,
                split: str = "train") -> dict[str, float]:
  """Estimated tokens per language in `split` (characters / sampled characters-per-token)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(data_dir)
  rates = {}
  for lang in langs:
    name = language_split(split, lang)
    chars = stats["per_split_language"].get(split, {}).get(lang, 0)
    if not chars or name not in builder.info.splits:
      continue
    n_chars = n_tokens = 0
    for ex in builder.as_dataset(split=name).take(sample_docs).as_numpy_iterator():
      text = ex["text"].decode("utf-8")
      n_chars += len(text)
      n_tokens += len(vocab.encode(text))
    rates[lang] = chars / max(n_chars / max(n_tokens, 1), 1e-9)
  return rates
