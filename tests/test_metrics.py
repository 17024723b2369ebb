"""Metrics: TensorBoard event files (tensorboardX) read back by TensorFlow, metrics.jsonl,
progress line. TensorFlow (the independent reader) is imported inside the tests only."""

import glob
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from coder_jax.train import metrics
from coder_jax.train.metrics import EventWriter, MetricsLog, Progress


# ----------------------------------------------------------------------------------------------
# CRC-32C and framing.

def test_imports_without_tensorflow_or_protobuf():
  code = ("import sys; import coder_jax.train.metrics; "
          "bad = [m for m in ('tensorflow', 'tensorboardX', 'google.protobuf', 'tensorboard', "
          "'jax') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------
# Event files, read back with TensorFlow.

SCALARS = [
    (0, {"loss": 10.5, "lr": 0.0}),
    (1, {"loss": 9.25, "lr": 3e-4, "mfu": 0.123}),
    (7, {"loss": float("nan"), "grad_norm": float("inf"), "neg": float("-inf")}),
    (123456789012, {"loss": 1.0 / 3.0, "big": 1e40, "tokens_per_s": 14200.0}),
    (-3, {"x": np.float32(2.5), "y": np.int64(4), "z": True}),
]


def _write_events(logdir):
  with EventWriter(logdir) as w:
    for step, values in SCALARS:
      w.scalars(step, values)
    w.scalars(99, {})  # writes nothing
    path = w.path
  assert w.closed
  return path


def _assert_close(got, want):
  want = float(np.float32(want)) if math.isfinite(want) and abs(want) < 3e38 else want
  if math.isnan(want):
    assert math.isnan(got)
  elif abs(want) > 3.4e38:
    assert math.isinf(got) and (got > 0) == (want > 0)
  else:
    assert got == pytest.approx(want, rel=1e-6, abs=1e-30)


def test_event_file_read_by_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  path = _write_events(tmp_path / "tb")
  assert os.path.basename(path).startswith("events.out.tfevents.")
  assert os.path.dirname(path) == str(tmp_path / "tb")

  # Record framing and CRCs checked by TF's own reader.
  raw = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(path)]
  assert len(raw) == 1 + len(SCALARS)

  events = list(tf.compat.v1.train.summary_iterator(path))
  assert len(events) == 1 + len(SCALARS)
  first = events[0]
  assert first.file_version == "brain.Event:2"
  assert not first.HasField("summary")
  assert first.wall_time > 1.6e9
  for event, (step, values) in zip(events[1:], SCALARS):
    assert event.step == step
    assert event.wall_time >= first.wall_time
    got = {v.tag: v.simple_value for v in event.summary.value}
    assert list(got) == list(values)
    for tag, want in values.items():
      _assert_close(got[tag], float(want))


def test_event_writer_unique_names(tmp_path):
  a, b = EventWriter(tmp_path), EventWriter(tmp_path)
  try:
    assert a.path != b.path
    assert all(os.path.basename(p).startswith("events.out.tfevents.") for p in (a.path, b.path))
  finally:
    a.close()
    b.close()
  with pytest.raises(ValueError):
    a.scalars(1, {"x": 1.0})


def test_event_file_read_by_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator
  _write_events(tmp_path / "tb")
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) >= {"loss", "lr", "mfu", "grad_norm", "big"}
  loss = acc.Scalars("loss")
  assert [e.step for e in loss] == [0, 1, 7, 123456789012]
  assert loss[1].value == pytest.approx(9.25)
  assert math.isnan(loss[2].value)


# ----------------------------------------------------------------------------------------------
# MetricsLog.

def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_metrics_log_jsonl_and_tensorboard(tmp_path):
  tf = pytest.importorskip("tensorflow")
  with MetricsLog(tmp_path) as log:
    log.write(1, {"loss": 2.5, "lr": np.float32(1e-3), "tokens": 4096})
    log.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf,
                  "per_expert": [0.1, float("nan"), 2.0], "hist": np.array([1.0, 2.5]),
                  "stage": "sft"})
    # Each line is on disk before close.
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 2
  assert rows[0] == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 4096}
  assert isinstance(rows[0]["loss"], float) and isinstance(rows[0]["tokens"], int)
  assert rows[1] == {"step": 2, "loss": "nan", "grad_norm": "inf", "x": "-inf",
                     "per_expert": [0.1, "nan", 2.0], "hist": [1.0, 2.5], "stage": "sft"}
  # Strictly valid JSON (no bare NaN / Infinity).
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    json.loads(line, parse_constant=lambda c: pytest.fail(f"bare constant {c}"))

  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1
  events = list(tf.compat.v1.train.summary_iterator(files[0]))
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [1, 2]
  tags1 = {v.tag: v.simple_value for v in events[1].summary.value}
  assert tags1 == {"loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 4096.0}
  tags2 = {v.tag: v.simple_value for v in events[2].summary.value}
  assert set(tags2) == {"loss", "grad_norm", "x"}  # lists and strings stay out of TensorBoard
  assert math.isnan(tags2["loss"]) and tags2["grad_norm"] == math.inf and tags2["x"] == -math.inf


def test_metrics_log_appends_on_reopen(tmp_path):
  with MetricsLog(tmp_path) as log:
    log.write(1, {"loss": 3.0})
    log.write(2, {"loss": 2.0})
  # A kill -9 mid-line leaves a partial last line: the resumed run starts on a fresh one.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')
  with MetricsLog(tmp_path) as log:
    log.write(3, {"loss": 1.5})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "loss": 3.0}
  assert json.loads(lines[1]) == {"step": 2, "loss": 2.0}
  assert lines[2] == '{"step": 3, "lo'
  assert json.loads(lines[3]) == {"step": 3, "loss": 1.5}
  assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """A run killed at step 5 after a checkpoint at 3 restarts with resume_step=3: the rows of
  steps 4-5 (and a torn line) leave metrics.jsonl, and the new event file starts with a
  SessionLog START at step 4, which makes TensorBoard drop the old events from step 4 on."""
  tf = pytest.importorskip("tensorflow")
  with MetricsLog(tmp_path) as log:
    for step in range(1, 6):
      log.write(step, {"loss": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  with MetricsLog(tmp_path, resume_step=3) as log:
    for step in (4, 5):
      log.write(step, {"loss": 10.0 + step})
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 14.0, 15.0]
  newest = max(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
  events = list(tf.compat.v1.train.summary_iterator(newest))
  start = events[1]
  assert start.step == 4 and start.session_log.status == tf.compat.v1.SessionLog.START
  assert [e.step for e in events[2:]] == [4, 5]
  # Without resume_step (a user appending by hand) nothing is removed.
  with MetricsLog(tmp_path) as log:
    log.write(6, {"loss": 1.0})
  assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_metrics_log_rejects_step_key_and_closed(tmp_path):
  log = MetricsLog(tmp_path)
  with pytest.raises(ValueError):
    log.write(1, {"step": 2})
  log.close()
  log.close()
  with pytest.raises(ValueError):
    log.write(1, {"loss": 1.0})


def test_metrics_log_disabled_writes_nothing(tmp_path):
  model_dir = tmp_path / "run"
  log = MetricsLog(model_dir, enabled=False)
  log.write(1, {"loss": 1.0, "per_expert": [1.0]})
  log.close()
  with MetricsLog(model_dir, enabled=False) as log2:
    log2.write(2, {"loss": 0.5})
  assert not model_dir.exists()


# ----------------------------------------------------------------------------------------------
# Progress.

class FakeClock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


class TTYStringIO(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_content():
  clock = FakeClock()
  p = Progress(100, stream=io.StringIO(), clock=clock)
  line = p.line(30, {"loss": 5.12345, "lr": 3e-4, "tokens_per_s": 14200.4, "mfu": 0.1234,
                     "grad_norm": 0.8123, "other": 7})
  assert line.startswith("[" + "#" * 9 + "." * 21 + "] 30/100  ")
  assert "loss 5.123" in line
  assert "lr 3.0e-04" in line
  assert "14,200 tok/s" in line
  assert "MFU 12.3%" in line
  assert "grad_norm 0.812" in line
  assert "other" not in line
  assert line.endswith("ETA ?")
  # Order as documented; missing keys are left out.
  assert line.index("loss") < line.index("lr") < line.index("tok/s") < line.index("MFU")
  bare = p.line(0, {})
  assert bare == "[" + "." * 30 + "] 0/100  ETA ?"
  assert p.line(150, {}).startswith("[" + "#" * 30 + "] 150/100")
  assert "[##########]" in Progress(10, width=10, stream=io.StringIO()).line(10, {})


def test_progress_eta_with_fake_clock():
  clock = FakeClock()
  out = io.StringIO()
  p = Progress(100, start_step=20, stream=out, clock=clock)
  clock.t += 10.0  # first step (compilation) took 10 s
  first = p.update(21, {"loss": 4.0})
  assert first.endswith("ETA ?")
  clock.t += 2.0 * 9  # 9 more steps
  second = p.update(30, {"loss": 3.0})
  # mean 28 s / 10 steps = 2.8 s per step, 70 steps left -> 196 s
  assert second.endswith("ETA 0:03:16")
  clock.t += 3600 * 10.0 - 28  # at step 40: 36000 s / 20 steps = 1800 s/step * 60 steps
  assert p.update(40, {}).endswith("ETA 30:00:00")
  assert p.update(100, {}).endswith("ETA 0:00:00")
  assert metrics.format_duration(83) == "0:01:23"


def test_progress_non_tty_prints_lines():
  out = io.StringIO()
  p = Progress(10, stream=out, clock=FakeClock())
  p.update(1, {"loss": 2.0})
  p.update(2, {"loss": 1.0})
  p.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.split("\n")
  assert len(lines) == 3 and lines[-1] == ""
  assert "1/10" in lines[0] and "loss 2.000" in lines[0]
  assert "2/10" in lines[1] and "loss 1.000" in lines[1]


def test_progress_tty_rewrites_line():
  out = TTYStringIO()
  p = Progress(10, stream=out, clock=FakeClock())
  a = p.update(1, {"loss": 2.0, "tokens_per_s": 1e6})
  assert out.getvalue() == "\r" + a
  b = p.update(2, {"loss": 1.0})
  assert len(b) < len(a)
  assert out.getvalue() == "\r" + a + "\r" + b.ljust(len(a))  # the longer line is overwritten
  assert "\n" not in out.getvalue()
  p.close()
  assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
  p.close()  # idempotent
  assert out.getvalue().count("\n") == 1


def test_progress_defaults_to_stderr(capsys):
  p = Progress(4, clock=FakeClock())
  p.update(2, {"loss": 1.25})
  p.close()
  err = capsys.readouterr().err
  assert "2/4" in err and "loss 1.250" in err


def test_progress_into_a_pipe_prints_every_n_seconds_and_the_last_step():
  clock, out = FakeClock(), io.StringIO()
  p = Progress(100, stream=out, clock=clock, every_s=30.0)
  printed = []
  for step in range(1, 101):
    clock.t += 4.0                       # 4 s a step: a line about every 8 steps
    p.update(step, {"loss": 1.0})
    printed = [l.split()[1] for l in out.getvalue().splitlines()]
  # The first update, then each once 30 s have passed since the last printed line, and step 100.
  assert printed == ["1/100", "9/100", "17/100", "25/100", "33/100", "41/100", "49/100",
                     "57/100", "65/100", "73/100", "81/100", "89/100", "97/100", "100/100"]
  p.close()
  assert out.getvalue().count("\n") == len(printed)   # nothing held back at the end


def test_progress_close_prints_the_step_a_stopped_run_reached():
  clock, out = FakeClock(), io.StringIO()
  p = Progress(1000, stream=out, clock=clock, every_s=30.0)
  for step in range(1, 8):
    clock.t += 1.0
    p.update(step, {"loss": float(step)})
  assert [l.split()[1] for l in out.getvalue().splitlines()] == ["1/1000"]
  p.message("step 7: eval_loss 2.5")   # a message line does not drop the held progress line
  p.close()
  lines = out.getvalue().splitlines()
  assert lines[1] == "step 7: eval_loss 2.5"
  assert lines[2].split()[1] == "7/1000" and "loss 7.000" in lines[2] and len(lines) == 3
  p.close()
  assert len(out.getvalue().splitlines()) == 3


def test_progress_on_a_terminal_rewrites_every_step_and_messages_start_a_new_line():
  clock, out = FakeClock(), TTYStringIO()
  p = Progress(10, stream=out, clock=clock, every_s=3600.0)
  for step in range(1, 4):
    p.update(step, {"loss": 1.0})      # the interval applies to files and pipes only
  assert out.getvalue().count("\r") == 3 and "\n" not in out.getvalue()
  p.message("step 3: non-finite loss")
  p.update(4, {})
  p.close()
  text = out.getvalue()
  assert "3/10" in text.split("\n")[0] and text.split("\n")[1] == "step 3: non-finite loss"
  assert text.split("\n")[2].startswith("\r") and "4/10" in text.split("\n")[2]
  assert text.endswith("\n") and text.count("\n") == 3


def test_split_modules_keep_the_old_imports():
  from coder_jax.train import events, progress
  assert metrics.EventWriter is events.EventWriter and metrics.Progress is progress.Progress
  assert metrics.format_duration is progress.format_duration
