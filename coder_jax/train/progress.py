"""The console progress line of a training run."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Mapping


def format_duration(seconds: float) -> str:
  """H:MM:SS (hours not wrapped at a day)."""
  total = max(0, int(round(seconds)))
  minutes, secs = divmod(total, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
  """A one-line training status, e.g.

    [#########.....................] 30/100  loss 5.123  lr 3.0e-04  14,200 tok/s  MFU 12.3%  ETA 0:01:23

  On a terminal `update` rewrites the line in place (carriage return, no newline) at every
  call. Into a file or a pipe (a log of a long run) it prints a line at the first update, then
  when `every_s` seconds have passed since the last printed one, and at the last step
  (total_steps); `close` prints the latest update if it was held back, so a log always ends with
  where the run stopped. Shown when present in the values: loss, lr, grad_norm, tokens_per_s,
  mfu (a fraction, shown in %). The ETA is the mean time per step since this Progress was
  created (steps done in this process, since start_step) times the steps left; it reads
  "ETA ?" until the second `update` call.
  """

  def __init__(self, total_steps: int, start_step: int = 0, stream=None, width: int = 30,
               clock: Callable[[], float] = time.monotonic, every_s: float = 30.0):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.stream = sys.stderr if stream is None else stream
    self.width = int(width)
    self._clock = clock
    self._t0 = clock()
    self._updates = 0
    self._last_len = 0
    self._open_line = False  # a TTY line written without its newline yet
    self.every_s = float(every_s)
    self._printed_at = None  # clock of the last line printed (not a TTY)
    self._held = None        # the latest line not printed yet (not a TTY)
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
    """Shows the line for `step` (see the class for when) and returns it."""
    self._updates += 1
    text = self.line(step, values)
    if self.is_tty:
      # Pad over the rest of a longer previous line.
      self.stream.write("\r" + text.ljust(self._last_len))
      self._last_len = len(text)
      self._open_line = True
      self.stream.flush()
      return text
    now = self._clock()
    if (self._printed_at is None or now - self._printed_at >= self.every_s
        or step >= self.total_steps):
      self._write_line(text)
      self._printed_at, self._held = now, None
    else:
      self._held = text
    return text

  def _write_line(self, text: str) -> None:
    self.stream.write(text + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line of its own (a warning, eval scores) that does not run into the progress line."""
    if self._open_line:
      self.stream.write("\n")
      self._open_line = False
      self._last_len = 0
    self._write_line(text)

  def close(self) -> None:
    if self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False
    if self._held is not None:
      self._write_line(self._held)
      self._held = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
