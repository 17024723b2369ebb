"""Training metrics: `{model_dir}/metrics.jsonl` and TensorBoard events, written together.

  log = MetricsLog(model_dir, enabled=jax.process_index() == 0)
  progress = Progress(total_steps, start_step=step)      # train/progress.py
  ...
  log.write(step, {"loss": 2.31, "lr": 3e-4, "tokens_per_s": 14200.0, "mfu": 0.123})
  progress.update(step, values)
  ...
  progress.close(); log.close()

`{model_dir}/metrics.jsonl` gets one JSON object per `write` ({"step": int, **values}), with
NaN / Inf as the strings "nan" / "inf" / "-inf" so every line stays valid JSON;
`{model_dir}/tensorboard/` gets one event per `write` with the scalar values (train/events.py).
EventWriter, Progress and format_duration are importable from here too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Mapping

import numpy as np

from coder_jax.files import write_atomic
from coder_jax.train.events import EventWriter
from coder_jax.train.progress import Progress, format_duration

__all__ = ["EventWriter", "MetricsLog", "Progress", "format_duration", "open_jsonl",
           "read_metrics"]


def read_metrics(model_dir: str | os.PathLike) -> dict[int, dict]:
  """step -> the last record metrics.jsonl holds for it ({} without the file). A resumed run
  logs the steps after its checkpoint again; a line cut by kill -9 is skipped."""
  out = {}
  path = os.path.join(os.fspath(model_dir), "metrics.jsonl")
  if os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        out[rec["step"]] = rec
  return out


def _json_float(x: float) -> float | str:
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def _json_scalar(x: Any) -> Any:
  if x is None or isinstance(x, (bool, np.bool_)):
    return None if x is None else bool(x)
  if isinstance(x, (numbers.Integral, np.integer)):
    return int(x)
  if isinstance(x, (numbers.Real, np.floating)):
    return _json_float(float(x))
  if isinstance(x, str):
    return x
  raise TypeError(f"metric value of unsupported type {type(x).__name__}: {x!r}")


def _normalize(value: Any) -> tuple[Any, float | None]:
  """(JSON-ready value, float for TensorBoard or None when the value is not a scalar)."""
  if isinstance(value, (list, tuple)):
    return [_normalize(v)[0] for v in value], None
  if hasattr(value, "__array__") and not isinstance(value, (numbers.Number, np.generic)):
    arr = np.asarray(value)  # numpy / jax arrays (fetched to host)
    if arr.ndim == 0:
      value = arr.item()
    else:
      return [_normalize(v)[0] for v in arr.tolist()], None
  elif isinstance(value, np.generic):
    value = value.item()
  json_value = _json_scalar(value)
  if isinstance(value, (bool, str)) or value is None:
    return json_value, None
  return json_value, float(value)


def open_jsonl(path: str, resume_step: int | None = None):
  """`path` opened to append {"step": int, ...} lines (created if missing). resume_step: the
  step a run restarts from; the lines a killed run wrote past it (and torn lines) are removed
  first, atomically, so the steps it replays appear once. A last line cut short by a kill is
  ended, so it cannot swallow the next one."""
  if resume_step is not None and os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= resume_step:
          keep.append(line)
      except (ValueError, KeyError, TypeError):
        continue
    if len(keep) != len(lines):
      write_atomic(path, "".join(line + "\n" for line in keep))
  needs_newline = False
  if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      needs_newline = f.read(1) != b"\n"
  out = open(path, "a", encoding="utf-8")
  if needs_newline:
    out.write("\n")
    out.flush()
  return out


class MetricsLog:
  """Appends {"step": int, **values} lines to `{model_dir}/metrics.jsonl` and scalar values to
  TensorBoard events in `{model_dir}/tensorboard/`.

  Values may be numbers (Python, numpy or 0-d arrays), lists / 1-d arrays of numbers (kept in
  the JSON line only), strings, bools or None (JSON only). NaN / +-Inf are written as the
  strings "nan" / "inf" / "-inf" in JSON and as floats in TensorBoard. Each line is flushed, so
  a killed process loses at most the line being written; reopening appends (a resumed run
  continues the file). `resume_step`: the step a run restarts from; the rows a killed run wrote
  past it are removed from metrics.jsonl (and TensorBoard is told to drop them) so the steps it
  replays appear once. With enabled=False (non-primary hosts) nothing is created or written.
  """

  FILENAME = "metrics.jsonl"
  TB_SUBDIR = "tensorboard"

  def __init__(self, model_dir: str | os.PathLike, *, enabled: bool = True,
               resume_step: int | None = None):
    self.model_dir = os.fspath(model_dir)
    self.enabled = bool(enabled)
    self.path = os.path.join(self.model_dir, self.FILENAME)
    self._file = None
    self._events = None
    if not self.enabled:
      return
    os.makedirs(self.model_dir, exist_ok=True)
    self._file = open_jsonl(self.path, resume_step)
    self._events = EventWriter(os.path.join(self.model_dir, self.TB_SUBDIR))
    if resume_step is not None:
      self._events.session_start(resume_step + 1)
      self._events.flush()

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if self._file is None:
      raise ValueError(f"MetricsLog for {self.model_dir} is closed")
    if "step" in values:
      raise ValueError("'step' is passed as the first argument, not among the values")
    record: dict[str, Any] = {"step": int(step)}
    scalars: dict[str, float] = {}
    for key, value in values.items():
      json_value, scalar = _normalize(value)
      record[str(key)] = json_value
      if scalar is not None:
        scalars[str(key)] = scalar
    line = json.dumps(record, allow_nan=False, ensure_ascii=False)
    self._file.write(line + "\n")
    self._file.flush()
    self._events.scalars(int(step), scalars)
    self._events.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
