"""TFDS builder over local code corpora (directory trees and JSONL), no download.

One pass reads the corpus (coder_jax.data.corpus: robust reading, deduplication, hash split), cuts
documents longer than `max_doc_chars` into parts (all parts of one document in its split), and
spills each document to a temporary JSONL file per (split, language); TFDS then writes one split
per (split, language), e.g. `train_python`, so a per-language SeqIO task reads only its own
records. Build statistics go to `build_stats.json` in the dataset directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from coder_jax.data.corpus import (MAX_DOC_CHARS, BuildStats, check_sources, cut_long,
                                   iter_documents, split_of)
from coder_jax.data.layout import STATS_NAME, TFDS_NAME
from coder_jax.data.tasks import language_split
from coder_jax.files import write_atomic


class CodeCorpusConfig(tfds.core.BuilderConfig):
  def __init__(self, *, sources, max_file_bytes: int = 1 << 20,
               validation_fraction: float = 0.01, max_doc_chars: int = MAX_DOC_CHARS, **kwargs):
    super().__init__(**kwargs)
    self.sources = tuple(os.path.abspath(s) for s in sources)
    self.max_file_bytes = max_file_bytes
    self.validation_fraction = validation_fraction
    self.max_doc_chars = max_doc_chars


class CodeCorpus(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local code corpora split per language."}
  BUILDER_CONFIGS = [CodeCorpusConfig(name="default", sources=())]

  @classmethod
  def _get_builder_name(cls) -> str:  # noqa: D401 - TFDS hook
    return TFDS_NAME

  def _info(self):
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": text, "lang": text, "path": text,
                                             "key": text}),
        description="Source code documents read from local files.")

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    self.build_stats = BuildStats()
    self._spill = tempfile.mkdtemp(prefix="code_corpus_spill_")
    handles, per_split_language = {}, {}
    try:
      for whole in iter_documents(cfg.sources, self.build_stats,
                                  max_file_bytes=cfg.max_file_bytes):
        split = split_of(whole.key, cfg.validation_fraction)  # no document straddles two splits
        parts = cut_long(whole, cfg.max_doc_chars)
        del whole
        if len(parts) > 1:
          self.build_stats.cut_documents += 1
        name = language_split(split, parts[0].lang)
        if name not in handles:
          handles[name] = open(os.path.join(self._spill, name + ".jsonl"), "w")
        while parts:
          doc = parts.pop(0)
          self.build_stats.add(doc, split)
          handles[name].write(json.dumps({"text": doc.text, "lang": doc.lang, "path": doc.path,
                                          "key": doc.key}) + "\n")
          counts = per_split_language.setdefault(split, {})
          counts[doc.lang] = counts.get(doc.lang, 0) + len(doc.text)
    finally:
      for h in handles.values():
        h.close()
    self.per_split_language = per_split_language
    if not handles:
      raise ValueError(f"sources: no usable documents in {', '.join(cfg.sources)}\n"
                       f"{self.build_stats.format()}")
    return {name: self._generate_examples(os.path.join(self._spill, name + ".jsonl"))
            for name in sorted(handles)}

  def _generate_examples(self, path):
    with open(path) as fh:
      for line in fh:
        rec = json.loads(line)
        yield rec["key"], rec


def config_name(sources, *, max_file_bytes: int = 1 << 20, validation_fraction: float = 0.01,
                max_doc_chars: int = MAX_DOC_CHARS) -> str:
  """A hash of the sources and settings, so a different corpus in the same DATA_DIR is a
  different dataset rather than a stale reuse."""
  spec = [sorted(os.path.abspath(s) for s in sources), max_file_bytes, validation_fraction]
  if max_file_bytes > max_doc_chars:  # only then can documents be cut (names of others stay)
    spec.append(max_doc_chars)
  return "src_" + hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


def check_settings(data_dir: str, max_file_bytes: int, validation_fraction: float,
                   max_doc_chars: int) -> None:
  """Bad settings as one-line errors before TFDS creates anything."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"{data_dir}: exists and is not a directory (a DATA_DIR must be one)")
  if max_file_bytes < 1:
    raise ValueError(f"max_file_bytes: must be positive, got {max_file_bytes}")
  if max_doc_chars < 2:
    raise ValueError(f"max_doc_chars: must be at least 2, got {max_doc_chars}")
  if not 0 <= validation_fraction < 1:  # also rejects NaN
    raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction!r}")


def build(sources, data_dir: str, *, name: str | None = None, max_file_bytes: int = 1 << 20,
          validation_fraction: float = 0.01,
          max_doc_chars: int = MAX_DOC_CHARS) -> tuple[str, dict]:
  """Build (or reuse) the dataset; returns (dataset directory, build statistics dict).

  The config name defaults to `config_name` of the sources and settings.
  """
  sources = check_sources(sources)  # before TFDS creates any directory
  check_settings(data_dir, max_file_bytes, validation_fraction, max_doc_chars)
  if name is None:
    name = config_name(sources, max_file_bytes=max_file_bytes,
                       validation_fraction=validation_fraction, max_doc_chars=max_doc_chars)
  builder = CodeCorpus(data_dir=data_dir, config=CodeCorpusConfig(
      name=name, sources=sources, max_file_bytes=max_file_bytes,
      validation_fraction=validation_fraction, max_doc_chars=max_doc_chars, version="1.0.0"))
  tfds.disable_progress_bar()
  stats_path = os.path.join(builder.data_dir, STATS_NAME)
  if os.path.exists(stats_path):
    with open(stats_path) as fh:
      return builder.data_dir, json.load(fh)
  if os.path.exists(builder.data_dir):  # prepared, but the build stopped before its statistics
    shutil.rmtree(builder.data_dir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  finally:
    spill = getattr(builder, "_spill", None)
    if spill:
      shutil.rmtree(spill, ignore_errors=True)
  stats = builder.build_stats.to_dict()
  stats["per_split_language"] = builder.per_split_language
  stats["sources"] = list(builder.builder_config.sources)
  write_atomic(stats_path, json.dumps(stats, indent=2))  # its presence marks a finished build
  return builder.data_dir, stats
