"""What the seekable stream (`stream.py`) needs to know of a corpus besides its records: the tasks
of the split with their mixing rates, and the TFRecord files of each.

Working it out registers the SeqIO tasks, which imports TensorFlow, SeqIO and TFDS: most of the
time to a first batch (about 10 s on 2 CPU cores). So the plan is kept in the user cache
(`usercache.py`) per corpus, tokenizer, split, task and rates, and a later start with the same
data settings imports none of them.

    {"version": 1, "tasks": {"code_python": {"rate": 1234.5, "filenames": [...],
                                             "shard_lengths": [...]}, ...}}
"""

from __future__ import annotations

import json
import os

from coder_jax.data import usercache
from coder_jax.data.layout import STATS_NAME, TOKENIZER_NAME

KIND = "stream_plans"
VERSION = 1
DATASET_INFO = "dataset_info.json"   # TFDS's description of the splits and their files


def plan_path(cfg) -> str | None:
  """The cache entry for a DataConfig's settings and the current contents of its corpus files."""
  tok = os.path.abspath(cfg.tokenizer)
  tok = os.path.join(tok, TOKENIZER_NAME) if os.path.isdir(tok) else tok
  rates = sorted((str(k), float(v)) for k, v in cfg.rates) if cfg.rates else None
  parts = (str(VERSION), os.path.abspath(cfg.data_dir), cfg.split, cfg.task or "",
           json.dumps(rates))
  files = (tok, os.path.join(cfg.data_dir, STATS_NAME), os.path.join(cfg.data_dir, DATASET_INFO))
  return usercache.entry_path(KIND, parts, files)


def cached_plan(cfg) -> dict | None:
  plan = usercache.read(plan_path(cfg))
  if not isinstance(plan, dict) or plan.get("version") != VERSION:
    return None
  return plan


def make_plan(cfg, provider) -> dict:
  """The plan from the registered mixture or task `provider`, kept for the next start."""
  import seqio
  import tensorflow_datasets as tfds
  from coder_jax.data.stream import check_file_format
  from coder_jax.data.tasks import language_split, load_build_stats, safe_name
  mixed = isinstance(provider, seqio.Mixture)
  lang = {f"code_{safe_name(l)}": l for l in load_build_stats(cfg.data_dir)["per_language"]}
  info = tfds.builder_from_directory(cfg.data_dir).info
  check_file_format(cfg.data_dir, str(info.file_format))
  tasks = {}
  for t in (provider.tasks if mixed else [provider]):
    if cfg.split not in t.splits:
      continue
    split = info.splits[language_split(cfg.split, lang[t.name])]
    tasks[t.name] = {"rate": float(provider.get_rate(t)) if mixed else 1.0,
                     "filenames": list(split.filenames),
                     "shard_lengths": [int(n) for n in split.shard_lengths]}
  plan = {"version": VERSION, "tasks": tasks}
  usercache.write(plan_path(cfg), plan)
  return plan
