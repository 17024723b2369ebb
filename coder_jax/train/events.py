"""TensorBoard event files through tensorboardX's writer (a maintained one; it and protobuf are
imported only when a writer is made, so importing this module needs neither, nor TensorFlow)."""

from __future__ import annotations

import glob
import itertools
import os
import time
from typing import Mapping

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
