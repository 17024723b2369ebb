"""What a DATA_DIR holds and which of its built corpora a command reads (no TensorFlow here).

    DATA_DIR/tokenizer.json                      one tokenizer for the directory
    DATA_DIR/code_corpus/<name>/1.0.0/           one TFDS dataset per build; <name> is "src_" and a
                                                 hash of its sources and settings; its
                                                 build_stats.json marks the build finished

Several builds can share a DATA_DIR (`data build` with other sources); then every reader must be
told which one (a dataset name, or the sources), it never picks one itself.
"""

from __future__ import annotations

import glob
import json
import os

TFDS_NAME = "code_corpus"
STATS_NAME = "build_stats.json"
TOKENIZER_NAME = "tokenizer.json"


def corpora(data_dir: str) -> list[str]:
  """Dataset directories of the finished builds in DATA_DIR, sorted."""
  found = glob.glob(os.path.join(glob.escape(data_dir), TFDS_NAME, "*", "*", STATS_NAME))
  return sorted(os.path.dirname(p) for p in found)


def corpus_name(dataset_dir: str) -> str:
  """The name a user picks a build by: its TFDS config name, e.g. "src_0123456789ab"."""
  return os.path.basename(os.path.dirname(os.path.normpath(dataset_dir)))


def tokenizer_of(dataset_dir: str) -> str:
  """DATA_DIR/tokenizer.json of a dataset directory (DATA_DIR/code_corpus/<name>/<version>)."""
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.normpath(dataset_dir))))
  return os.path.join(data_dir, TOKENIZER_NAME)


def describe(dataset_dir: str) -> str:
  try:
    with open(os.path.join(dataset_dir, STATS_NAME)) as fh:
      sources = json.load(fh).get("sources") or []
  except (OSError, ValueError, AttributeError):
    sources = []
  return f"{corpus_name(dataset_dir)} (from {', '.join(sources) or 'unknown sources'})"


def several(data_dir: str, found: list[str]) -> ValueError:
  return ValueError(
      f"{data_dir}: holds {len(found)} corpora: {'; '.join(describe(d) for d in found)}; choose "
      "one by name (`--dataset NAME` on the command line, CodeData.dataset = 'NAME' in gin) or "
      "by its sources (CodeData.sources)")


def find_dataset(data_dir: str, dataset: str | None = None) -> str:
  """The dataset directory to read: DATA_DIR's only build, or the one named `dataset`.

  data_dir may also be a dataset directory itself (the one holding build_stats.json).
  """
  if os.path.isfile(os.path.join(data_dir, STATS_NAME)):
    return data_dir
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"{data_dir}: is a file, not a DATA_DIR (a directory `python -m "
                     "coder_jax.data build --out` wrote)")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"{data_dir}: no built corpus, no such directory (run `python -m "
                            "coder_jax.data build --out DATA_DIR`)")
  found = corpora(data_dir)
  if dataset is not None:
    for d in found:
      if dataset in (corpus_name(d), d) or os.path.abspath(dataset) == os.path.abspath(d):
        return d
    raise ValueError(f"dataset: {dataset!r} is not a corpus built in {data_dir} (it holds: "
                     f"{'; '.join(describe(d) for d in found) or 'none'})")
  if not found:
    raise FileNotFoundError(f"{data_dir}: no built corpus (run `python -m coder_jax.data build`)")
  if len(found) > 1:
    raise several(data_dir, found)
  return found[0]
