"""What a directory holds, for tests that show a fault changed nothing outside its target."""

import hashlib
import os


def tree(d) -> dict:
  """Every file under d (relative path -> sha256 of its bytes) and every directory (-> None)."""
  out = {}
  for root, dirs, files in os.walk(d):
    for n in dirs:
      out[os.path.relpath(os.path.join(root, n), d) + "/"] = None
    for n in files:
      with open(os.path.join(root, n), "rb") as fh:
        out[os.path.relpath(os.path.join(root, n), d)] = hashlib.sha256(fh.read()).hexdigest()
  return out
