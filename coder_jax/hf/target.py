"""Which directory an HF export may replace: only an earlier HF export, never anything else.

A user once pointed `export --overwrite` at the training directory and lost its checkpoints, so
replacing a directory requires that everything in it is a file an export writes.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

# Files hf.save writes; a directory holding only these (or nothing) may be replaced.
EXPORT_FILES = frozenset({
    "config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What marks a training MODEL_DIR (train/checkpoint.py, train/metrics.py).
TRAINING_MARKS = ("checkpoints", "metrics.jsonl")


def _is_export_file(d: str, name: str) -> bool:
  full = os.path.join(d, name)
  if os.path.islink(full) or not os.path.isfile(full):
    return False
  return name in EXPORT_FILES or bool(_SHARD.fullmatch(name))


def _overlaps(a: str, b: str) -> bool:
  """a is b, inside b, or holds b."""
  return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def check_target(out_dir: str, *, overwrite: bool, sources: Sequence[str] = ()) -> None:
  """Raise (one line, naming the path) unless out_dir is new, or overwrite is set and out_dir
  is an earlier HF export that is not one of `sources` (or inside one, or holding one)."""
  if not os.path.lexists(out_dir):
    return
  if not overwrite:
    raise FileExistsError(f"{out_dir}: exists (pass overwrite=True / --overwrite to replace an "
                          "earlier HF export there)")
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir}: exists and is a file or a link, not a directory; "
                          "refusing to replace it")
  real = os.path.realpath(out_dir)
  for src in sources:
    if src and _overlaps(real, os.path.realpath(src)):
      raise ValueError(f"{out_dir}: is, holds or lies inside the export's source {src}; "
                       "write the export somewhere else")
  names = sorted(os.listdir(out_dir))
  marks = [m for m in TRAINING_MARKS if m in names]
  if marks:
    raise ValueError(f"{out_dir}: is a training directory (holds {', '.join(marks)}); "
                     "--overwrite replaces only an earlier HF export")
  foreign = [n for n in names if not _is_export_file(out_dir, n)]
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise ValueError(f"{out_dir}: holds {shown}, which an HF export does not write; "
                     "--overwrite replaces only an earlier HF export")
