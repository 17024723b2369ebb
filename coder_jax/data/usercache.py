"""Results kept between starts in the user's cache directory ($XDG_CACHE_HOME or ~/.cache, then
coder_jax/<kind>/), never in a DATA_DIR (reading one never writes into it). An entry is a JSON
file named by a hash of what it was computed from, so changed inputs find no entry; writing is
best effort (with nowhere to keep it, the work is done again next time)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from coder_jax.files import write_atomic


def entry_path(kind: str, parts: Sequence[str], files: Sequence[str]) -> str | None:
  """Where the entry of `kind` for `parts` (strings) and the contents of `files` is kept; None
  when one of the files cannot be read (the caller then fails where it reads it itself)."""
  key = hashlib.sha256()
  for part in parts:
    key.update(part.encode() + b"\0")
  try:
    for path in files:
      with open(path, "rb") as fh:
        key.update(hashlib.sha256(fh.read()).digest())
  except OSError:
    return None
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "coder_jax", kind, key.hexdigest()[:32] + ".json")


def read(path: str | None) -> Any | None:
  if path is None:
    return None
  try:
    with open(path) as fh:
      return json.load(fh)
  except (OSError, ValueError):
    return None


def write(path: str | None, value: Any) -> None:
  if path is None:
    return
  try:
    write_atomic(path, json.dumps(value))
  except OSError:
    pass
