"""Training metrics: a JSON-lines log, TensorBoard event files and a console progress line.

The TensorBoard event files are written by tensorboardX (a maintained writer; it and protobuf
are imported only when a writer is made, so importing this module needs neither, nor
TensorFlow).

  log = MetricsLog(model_dir, enabled=jax.process_index() == 0)
  progress = Progress(total_steps, start_step=step)
  ...
  log.write(step, {"loss": 2.31, "lr": 3e-4, "tokens_per_s": 14200.0, "mfu": 0.123})
  progress.update(step, values)
  ...
  progress.close(); log.close()

`{model_dir}/metrics.jsonl` gets one JSON object per `write` ({"step": int, **values}), with
NaN / Inf as the strings "nan" / "inf" / "-inf" so every line stays valid JSON;
`{model_dir}/tensorboard/` gets one event per `write` with the scalar values.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

# ----------------------------------------------------------------------------------------------
# TensorBoard event files, through tensorboardX's writer (imported when a writer is made).

_WRITERS = itertools.count()


class EventWriter:
  """Writes scalar summaries to a new TensorBoard event file in `logdir`.

  with EventWriter(logdir) as w:
    w.scalars(step, {"loss": 2.3, "lr": 3e-4})
  """

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX.writer import FileWriter
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    # tensorboardX names files by time and host: the pid and a counter keep two writers apart.
    suffix = f".{os.getpid()}.{next(_WRITERS)}.coder_jax"
    self._writer = FileWriter(self.logdir, flush_secs=10, filename_suffix=suffix)
    self.flush()
    self.path, = glob.glob(os.path.join(glob.escape(self.logdir), f"events.out.tfevents.*{suffix}"))

  @property
  def closed(self) -> bool:
    return self._writer is None

  def _check_open(self) -> None:
    if self._writer is None:
      raise ValueError(f"EventWriter for {self.logdir} is closed")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at `step` holding every value of `values` as a float32 simple_value.

    NaN and +-Inf are written as they are (TensorBoard shows them); an empty dict writes nothing.
    """
    self._check_open()
    if not values:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    summary = Summary(value=[Summary.Value(tag=str(tag), simple_value=float(v))
                             for tag, v in values.items()])
    self._writer.add_summary(summary, int(step), walltime=time.time())

  def session_start(self, step: int) -> None:
    """A restart at `step`: TensorBoard then drops the events at `step` and later written before
    it (the steps a killed run logged past its last checkpoint)."""
    self._check_open()
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    self._writer.add_event(Event(wall_time=time.time(), step=int(step),
                                 session_log=SessionLog(status=SessionLog.START)))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


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


# ----------------------------------------------------------------------------------------------
# JSON-lines + TensorBoard metrics log.

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
    if resume_step is not None and os.path.exists(self.path):
      self._drop_rows_after(resume_step)
    # A line cut short by a kill would swallow the next one: start on a fresh line.
    needs_newline = False
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    self._file = open(self.path, "a", encoding="utf-8")
    if needs_newline:
      self._file.write("\n")
      self._file.flush()
    self._events = EventWriter(os.path.join(self.model_dir, self.TB_SUBDIR))
    if resume_step is not None:
      self._events.session_start(resume_step + 1)
      self._events.flush()

  def _drop_rows_after(self, step: int) -> None:
    """Rewrites metrics.jsonl without rows past `step` (and torn lines), atomically."""
    with open(self.path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= step:
          keep.append(line)
      except (ValueError, KeyError, TypeError):
        continue
    if len(keep) == len(lines):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, self.path)

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


# ----------------------------------------------------------------------------------------------
# Console progress line.

def format_duration(seconds: float) -> str:
  """H:MM:SS (hours not wrapped at a day)."""
  total = max(0, int(round(seconds)))
  minutes, secs = divmod(total, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
  """A one-line training status, e.g.

    [#########.....................] 30/100  loss 5.123  lr 3.0e-04  14,200 tok/s  MFU 12.3%  ETA 0:01:23

  `update` rewrites the line in place (carriage return, no newline) on a TTY and prints one line
  per update otherwise. Shown when present in the values: loss, lr, grad_norm, tokens_per_s,
  mfu (a fraction, shown in %). The ETA is the mean time per step since this Progress was
  created (steps done in this process, since start_step) times the steps left; it reads
  "ETA ?" until the second `update` call.
  """

  def __init__(self, total_steps: int, start_step: int = 0, stream=None, width: int = 30,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.stream = sys.stderr if stream is None else stream
    self.width = int(width)
    self._clock = clock
    self._t0 = clock()
    self._updates = 0
    self._last_len = 0
    self._open_line = False  # a TTY line written without its newline yet
    try:
      self.is_tty = bool(self.stream.isatty())
    except (AttributeError, ValueError, OSError):
      self.is_tty = False

  def _bar(self, step: int) -> str:
    frac = step / self.total_steps if self.total_steps > 0 else 1.0
    frac = min(max(frac, 0.0), 1.0)
    filled = int(frac * self.width)
    return "[" + "#" * filled + "." * (self.width - filled) + "]"

  def eta_seconds(self, step: int) -> float | None:
    """Seconds left at `step`, or None before the second update or without steps done."""
    done = step - self.start_step
    if self._updates < 2 or done <= 0:
      return None
    per_step = (self._clock() - self._t0) / done
    return per_step * max(self.total_steps - step, 0)

  def line(self, step: int, values: Mapping[str, Any] | None = None) -> str:
    values = values or {}
    parts = [f"{self._bar(step)} {step}/{self.total_steps}"]
    if values.get("loss") is not None:
      parts.append(f"loss {float(values['loss']):.3f}")
    if values.get("lr") is not None:
      parts.append(f"lr {float(values['lr']):.1e}")
    if values.get("grad_norm") is not None:
      parts.append(f"grad_norm {float(values['grad_norm']):.3f}")
    if values.get("tokens_per_s") is not None:
      tps = float(values["tokens_per_s"])
      parts.append(f"{tps:,.0f} tok/s" if math.isfinite(tps) else f"{tps} tok/s")
    if values.get("mfu") is not None:
      parts.append(f"MFU {100.0 * float(values['mfu']):.1f}%")
    eta = self.eta_seconds(step)
    parts.append("ETA ?" if eta is None else f"ETA {format_duration(eta)}")
    return "  ".join(parts)

  def update(self, step: int, values: Mapping[str, Any] | None = None) -> str:
    self._updates += 1
    text = self.line(step, values)
    if self.is_tty:
      # Pad over the rest of a longer previous line.
      self.stream.write("\r" + text.ljust(self._last_len))
      self._last_len = len(text)
      self._open_line = True
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    return text

  def close(self) -> None:
    if self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
