"""Training metrics: a JSON-lines log, TensorBoard event files and a console progress line.

Only the standard library and numpy are needed: the TensorBoard event files are written here
directly (TFRecord framing with masked CRC-32C, and a hand-rolled encoding of the three protobuf
messages a scalar summary needs), so neither TensorFlow nor tensorboardX nor protobuf is
imported.

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

import json
import math
import numbers
import os
import socket
import struct
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli) and TFRecord framing.

_CRC32C_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed (the reflected form used with LSB-first).


def _make_crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as an unsigned 32-bit int (b"123456789" -> 0xE3069283)."""
  table = _CRC32C_TABLE
  crc = 0xFFFFFFFF
  for byte in bytes(data):
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xa282ead8 (mod 2^32)."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length bytes, data, masked CRC of data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# ----------------------------------------------------------------------------------------------
# Minimal protobuf encoding of tensorflow.Event / Summary / Summary.Value.

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  """Base-128 varint; negative ints as their 64-bit two's complement (10 bytes), as int64 is."""
  value = int(value)
  if value < 0:
    value &= (1 << 64) - 1
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _field_varint(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(value)


def _field_bytes(field: int, payload: bytes) -> bytes:
  return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _field_double(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", float(value))


def _float32_bytes(value: float) -> bytes:
  # Through numpy so values beyond float32's range become +-inf instead of raising.
  with np.errstate(over="ignore"):
    return np.asarray(value, dtype="<f4").tobytes()


def _field_float(field: int, value: float) -> bytes:
  return _key(field, _FIXED32) + _float32_bytes(value)


def _summary_value(tag: str, simple_value: float) -> bytes:
  """Summary.Value {tag = 1 (string), simple_value = 2 (float)}."""
  return _field_bytes(1, tag.encode("utf-8")) + _field_float(2, simple_value)


def _summary(values: Mapping[str, float]) -> bytes:
  """Summary {value = 1 (repeated Value)}."""
  return b"".join(_field_bytes(1, _summary_value(tag, v)) for tag, v in values.items())


SESSION_START = 1  # SessionLog.SessionStatus.START


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None,
                 session_status: int | None = None) -> bytes:
  """Event {wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5,
  session_log = 7 (SessionLog {status = 1})}."""
  out = _field_double(1, wall_time)
  if step:
    out += _field_varint(2, step)  # proto3: a zero step is the default and is left out
  if file_version is not None:
    out += _field_bytes(3, file_version.encode("utf-8"))
  if scalars is not None:
    out += _field_bytes(5, _summary(scalars))
  if session_status is not None:
    out += _field_bytes(7, _field_varint(1, session_status))
  return out


# ----------------------------------------------------------------------------------------------
# TensorBoard event file writer.

FILE_VERSION = "brain.Event:2"


class EventWriter:
  """Writes scalar summaries to a new TensorBoard event file in `logdir`.

  with EventWriter(logdir) as w:
    w.scalars(step, {"loss": 2.3, "lr": 3e-4})
  """

  def __init__(self, logdir: str | os.PathLike):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    base = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            ".coder_jax")
    # Two writers of one process in one second would share a name: number the later ones.
    suffix = 0
    while True:
      name = base if suffix == 0 else f"{base}.{suffix}"
      path = os.path.join(self.logdir, name)
      try:
        self._file = open(path, "xb")
        break
      except FileExistsError:
        suffix += 1
    self.path = path
    self._write_event(encode_event(time.time(), file_version=FILE_VERSION))
    self.flush()

  @property
  def closed(self) -> bool:
    return self._file is None

  def _write_event(self, event: bytes) -> None:
    if self._file is None:
      raise ValueError(f"EventWriter for {self.logdir} is closed")
    self._file.write(tfrecord(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at `step` holding every value of `values` as a float32 simple_value.

    NaN and +-Inf are written as they are (TensorBoard shows them); an empty dict writes nothing.
    """
    if not values:
      if self._file is None:
        raise ValueError(f"EventWriter for {self.logdir} is closed")
      return
    converted = {str(tag): float(value) for tag, value in values.items()}
    self._write_event(encode_event(time.time(), int(step), scalars=converted))

  def session_start(self, step: int) -> None:
    """A restart at `step`: TensorBoard then drops the events at `step` and later written before
    it (the steps a killed run logged past its last checkpoint)."""
    self._write_event(encode_event(time.time(), int(step), session_status=SESSION_START))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.flush()
      self._file.close()
      self._file = None

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


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
