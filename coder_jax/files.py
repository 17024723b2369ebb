"""Files and directories that appear whole or not at all: written beside the target, then renamed
over it, so a reader (or the next start after a kill) never sees half of one. No jax here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """`data` (text is written as UTF-8) at `path`, replacing any file there in one rename; the
  parent directory is made when missing."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # Per process, so two writers of one path never share a temporary file.
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    if isinstance(data, str):
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    else:
      with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def new_directory(target: str | os.PathLike, *, replace: bool = False) -> Iterator[str]:
  """with new_directory(out) as tmp: write into tmp; it becomes `out` when the block ends
  without an error, and is removed otherwise. replace: an existing `out` is moved aside and
  deleted after the rename (else the rename fails on it)."""
  target = os.path.abspath(os.fspath(target))
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(target)
  tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)   # mkdtemp makes it private; the result is an ordinary directory
    if replace and os.path.exists(target):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(target, os.path.join(old, "x"))
      os.rename(tmp, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
