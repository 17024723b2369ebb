"""TFDS builder over local code corpora (directory trees and JSONL), no download.

One pass reads the corpus (coder_jax.data.corpus: robust reading, deduplication, hash split) and
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

from coder_jax.data.corpus import BuildStats, check_sources, iter_documents, split_of
from coder_jax.data.tasks import TFDS_NAME, language_split

STATS_NAME = "build_stats.json"


class CodeCorpusConfig(tfds.core.BuilderConfig):
  def __init__(self, *, sources, max_file_bytes: int = 1 << 20,
               validation_fraction: float = 0.01, **kwargs):
    super().__init__(**kwargs)
    self.sources = tuple(os.path.abspath(s) for s in sources)
    self.max_file_bytes = max_file_bytes
    self.validation_fraction = validation_fraction


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
      for doc in iter_documents(cfg.sources, self.build_stats, max_file_bytes=cfg.max_file_bytes):
        split = split_of(doc.key, cfg.validation_fraction)
        self.build_stats.add(doc, split)
        name = language_split(split, doc.lang)
        if name not in handles:
          handles[name] = open(os.path.join(self._spill, name + ".jsonl"), "w")
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


def build(sources, data_dir: str, *, name: str | None = None, max_file_bytes: int = 1 << 20,
          validation_fraction: float = 0.01) -> tuple[str, dict]:
  """Build (or reuse) the dataset; returns (dataset directory, build statistics dict).

  The config name defaults to a hash of the sources and settings, so a different corpus in the
  same DATA_DIR is a different dataset rather than a stale reuse.
  """
  sources = check_sources(sources)  # before TFDS creates any directory
  if name is None:
    spec = json.dumps([sorted(os.path.abspath(s) for s in sources), max_file_bytes,
                       validation_fraction])
    name = "src_" + hashlib.sha256(spec.encode()).hexdigest()[:12]
  builder = CodeCorpus(data_dir=data_dir, config=CodeCorpusConfig(
      name=name, sources=sources, max_file_bytes=max_file_bytes,
      validation_fraction=validation_fraction, version="1.0.0"))
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
  with open(stats_path + ".tmp", "w") as fh:
    json.dump(stats, fh, indent=2)
  os.replace(stats_path + ".tmp", stats_path)  # its presence marks a finished build
  return builder.data_dir, stats
