"""Reading a run's metrics.jsonl in tests."""

import json
import os


def read_metrics(model_dir) -> dict:
  """step -> last logged record (a resumed run logs the steps after its checkpoint again; a line
  cut by kill -9 is skipped)."""
  out = {}
  path = os.path.join(str(model_dir), "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      out[rec["step"]] = rec
  return out
