"""Constant-time data resume: a saved position continues the stream bit for bit, reading only
the documents in progress; host-count changes and old batch-count states; the preemption guard's
modes."""

import glob
import json
import os
import shutil
import signal
import sysconfig

import numpy as np
import pytest

from coder_jax.data import stream as stream_mod
from coder_jax.data.builder import build
from coder_jax.data.corpus import BuildStats, iter_documents
from coder_jax.data.fim import FimConfig
from coder_jax.data.pipeline import DataConfig, Pipeline, pack
from coder_jax.data.tokenizer import train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume_corpus")
  src = root / "src"
  shutil.copytree(os.path.join(STDLIB, "json"), src / "json")
  for name in ("bisect.py", "colorsys.py", "keyword.py", "textwrap.py"):
    shutil.copy(os.path.join(STDLIB, name), src / name)
  (src / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
  (src / "Main.java").write_text("class Main { public static void main(String[] a) {} }\n")
  dataset_dir, _ = build([str(src)], str(root / "data"), validation_fraction=0.0)
  tok = str(root / "tokenizer.json")
  train_tokenizer([d.text for d in iter_documents([str(src)], BuildStats())], 600, tok)
  return dict(dataset_dir=dataset_dir, tok=tok)


def _cfg(corpus, **kw):
  # FIM and long-document upsampling on: both must survive a resume.
  base = dict(data_dir=corpus["dataset_dir"], tokenizer=corpus["tok"], seq_len=128,
              batch_size=2, seed=3, fim=FimConfig(rate=0.5, seed=3), long_doc_min_tokens=400,
              long_doc_factor=3)
  return DataConfig(**{**base, **kw})


def _same(x, y):
  return all(np.array_equal(x[k], y[k]) for k in x)


def _roundtrip(state):
  return json.loads(json.dumps(state))   # what a checkpoint stores


@pytest.fixture(scope="module")
def straight(corpus):
  """40 batches read straight through (the state before each, the documents each one read)."""
  reads = []
  real_get = stream_mod.RecordSplit.get

  def counting_get(self, i):
    reads[-1] += 1
    return real_get(self, i)

  pipe = Pipeline(_cfg(corpus), prefetch=0)
  states, batches = [], []
  stream_mod.RecordSplit.get = counting_get
  try:
    for _ in range(40):
      states.append(_roundtrip(pipe.state()))
      reads.append(0)
      batches.append(next(pipe))
  finally:
    stream_mod.RecordSplit.get = real_get
  ahead = Pipeline(_cfg(corpus))   # the background thread makes the same batches
  assert all(_same(a, next(ahead)) for a in batches)
  ahead.close()
  return dict(states=states, batches=batches, reads=reads)


def test_resume_at_any_batch_is_bit_exact(corpus, straight):
  states, batches = straight["states"], straight["batches"]
  tested = (0, 1, 6, 17, 39)
  tasks = [states[n]["stream"]["tasks"] for n in tested]
  # The tested positions lie past epoch ends (the one-document languages wrap) and inside
  # documents (a row cut mid-document).
  assert max(p[0] for t in tasks for p in t.values()) >= 1
  assert any(p[2] > 1 for t in tasks for p in t.values())
  for n in tested:
    resumed = Pipeline(_cfg(corpus), position=states[n])
    assert resumed.state() == {**states[n], "stream": resumed.state()["stream"]}
    for want in batches[n:n + 2]:
      assert _same(want, next(resumed)), n
    resumed.close()


def test_a_seek_reads_only_the_documents_in_progress(corpus, straight, monkeypatch):
  """Constant time: after a seek to batch n the next batch reads at most one document per
  language (the ones in progress) beyond what that batch reads in the straight run."""
  n_tasks = 3
  for n in (1, 39):
    count = [0]
    real_get = stream_mod.RecordSplit.get

    def counting_get(self, i, count=count, real_get=real_get):
      count[0] += 1
      return real_get(self, i)

    monkeypatch.setattr(stream_mod.RecordSplit, "get", counting_get)
    pipe = Pipeline(_cfg(corpus), position=straight["states"][n], prefetch=0)
    assert _same(straight["batches"][n], next(pipe))
    assert count[0] <= straight["reads"][n] + n_tasks, (n, count[0], straight["reads"][n])
    monkeypatch.undo()


def test_start_batch_alone_replays_to_the_same_position(corpus, straight):
  replayed = Pipeline(_cfg(corpus), start_batch=6)
  assert replayed.state() == straight["states"][6]
  assert _same(straight["batches"][6], next(replayed))
  replayed.close()


def test_hosts_take_their_own_position_and_a_changed_count_is_refused(corpus):
  cfg = _cfg(corpus)
  firsts, saved = [], []
  for i in range(2):
    p = Pipeline(cfg, shard_index=i, num_shards=2, prefetch=0)
    for _ in range(3):
      next(p)
    saved.append(_roundtrip(p.state()))
    firsts.append(next(p))
  assert not _same(firsts[0], firsts[1])
  multi = {**saved[0], "hosts": saved}   # what a two-process checkpoint stores
  for i in range(2):
    assert _same(firsts[i], next(Pipeline(cfg, shard_index=i, num_shards=2, position=multi)))
  msg = "^data: the checkpoint's data position is for 2 hosts, this run has {}"
  with pytest.raises(ValueError, match=msg.format(3)):
    Pipeline(cfg, shard_index=0, num_shards=3, position=multi)
  with pytest.raises(ValueError, match=msg.format(1)):
    Pipeline(cfg, position=saved[0])


def test_a_changed_seq_len_is_refused(corpus, straight):
  with pytest.raises(ValueError, match="^data: the checkpoint's data position was made with "
                                       "seq_len=128, this run has seq_len=64"):
    Pipeline(_cfg(corpus, seq_len=64), position=straight["states"][3])


def test_a_batch_count_only_state_replays_the_seqio_stream(corpus, capsys):
  cfg = _cfg(corpus, long_doc_min_tokens=0, long_doc_factor=1)
  old = Pipeline(cfg)
  rows = pack(old.pieces(), cfg.seq_len, old.vocabulary.bos_id)
  seqio_rows = [next(rows) for _ in range(6)]
  legacy = Pipeline(cfg, position={"batches": 2})
  assert "replaying the earlier SeqIO stream" in capsys.readouterr().err
  got = next(legacy)
  for r in range(2):
    assert all(np.array_equal(got[k][r], seqio_rows[4 + r][k]) for k in got)
  assert legacy.state() == {"batches": 3, "shard_index": 0, "num_shards": 1, "seed": 3}
  legacy.close()


# ------------------------------------------------------------------------ PreemptionGuard

def _guard(monkeypatch, nproc, sync_manager, manager=None, **kw):
  import jax
  from jax._src import distributed
  from coder_jax.train.checkpoint import PreemptionGuard
  monkeypatch.setattr(jax, "process_count", lambda: nproc)
  monkeypatch.setattr(distributed.global_state, "preemption_sync_manager", sync_manager)
  return PreemptionGuard(manager, **kw)


def test_one_process_guard_uses_signals(monkeypatch):
  guard = _guard(monkeypatch, 1, None)
  with guard:
    assert guard.mode == "signal" and not guard.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested(2) and guard.signal_name == "SIGTERM"


def test_multi_process_guard_asks_the_coordination_service(monkeypatch):
  class Manager:
    asked = []

    def reached_preemption(self, step):
      self.asked.append(step)
      return step == 7

  before = signal.getsignal(signal.SIGTERM)
  guard = _guard(monkeypatch, 2, object(), Manager())
  with guard:
    assert guard.mode == "coordination"
    assert signal.getsignal(signal.SIGTERM) is before   # jax's C++ notifier keeps SIGTERM
    assert [guard.requested(s) for s in range(5, 9)] == [False, False, True, False]
    assert guard.signal_name == "SIGTERM"
  assert Manager.asked == [5, 6, 7, 8]


def test_without_the_preemption_service_flags_are_gathered_every_k_steps(monkeypatch):
  from jax.experimental import multihost_utils
  calls = []
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: calls.append(1) or np.array([[False], [True]]))
  guard = _guard(monkeypatch, 2, None, fallback_every=4)
  with guard:
    assert guard.mode == "gather"
    assert [guard.requested(s) for s in range(1, 9)] == [False, False, False, True] * 2
  assert len(calls) == 2


_TWO_PROCESS_GUARD = r"""
import json, os, signal, sys, time
import jax
from coder_jax.parallel.distributed import initialize_from_env
assert initialize_from_env()
from coder_jax.train.checkpoint import Checkpointer, PreemptionGuard, gather_json
me = jax.process_index()
ckpt = Checkpointer(sys.argv[1], every=1000)
hosts = gather_json({"host": me})
out = {"hosts": hosts}
with PreemptionGuard(ckpt.manager) as guard:
  for step in range(1, 20000):
    if me == 1 and step == 5:
      os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    time.sleep(0.005 * (me + 1))   # the processes run at different speeds
    if guard.requested(step):
      out.update(step=step, mode=guard.mode, signal=guard.signal_name)
      break
ckpt.close()
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_two_processes_stop_at_the_same_step_through_the_coordination_service(tmp_path, sig):
  """Real processes over loopback: a notice to one process stops both after the same step, with
  no per-step collective (jax's preemption sync manager); Ctrl-C is passed on the same way.
  Each process's JSON reaches every process (the data positions of a multi-host save)."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = 21000 + (os.getpid() + (sig == "SIGINT")) % 20000
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             CODER_JAX_COORDINATOR=f"127.0.0.1:{port}", CODER_JAX_NUM_PROCESSES="2")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # see test_pretrain_resume._env
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_GUARD, str(tmp_path), sig],
                            env={**env, "CODER_JAX_PROCESS_ID": str(i)}, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  res = [json.loads(o.split("RESULT ")[1].splitlines()[0]) for o in outs]
  assert res[0]["step"] == res[1]["step"] > 5, res
  assert res[0]["mode"] == res[1]["mode"] == "coordination"
  assert res[1]["signal"] == sig and res[0]["signal"] == "SIGTERM"
  assert res[0]["hosts"] == res[1]["hosts"] == [{"host": 0}, {"host": 1}]


# ----------------------------------------------------------------------------------------------
# The stream's plan, kept per data directory: a second start registers no SeqIO task.

def test_a_second_start_reads_the_plan_instead_of_registering_tasks(corpus, straight, tmp_path,
                                                                    monkeypatch):
  from coder_jax.data import stream_plan
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  cfg = _cfg(corpus)
  first = Pipeline(cfg, prefetch=0)
  assert _same(straight["batches"][0], next(first))
  path = stream_plan.plan_path(cfg)
  assert path.startswith(str(tmp_path / "cache" / "coder_jax" / "stream_plans"))
  plan = stream_plan.cached_plan(cfg)
  assert plan["version"] == stream_plan.VERSION and plan["tasks"]

  def no_registration(self):
    raise AssertionError("a second start registered the SeqIO tasks")

  monkeypatch.setattr(Pipeline, "_provider", no_registration)
  again = Pipeline(cfg, prefetch=0)
  for want in straight["batches"][:3]:
    assert _same(want, next(again))
  resumed = Pipeline(cfg, position=straight["states"][17], prefetch=0)
  assert _same(straight["batches"][17], next(resumed))
  # Other settings or a changed corpus file make another plan.
  other = _cfg(corpus, rates=tuple((t, 1.0) for t in ("c", "java", "python")))
  assert stream_plan.plan_path(other) != path
  assert stream_plan.plan_path(_cfg(corpus, split="validation")) != path
  with pytest.raises(AssertionError, match="registered"):
    next(Pipeline(other, prefetch=0))


_SECOND_START = """
import hashlib, json, sys
from coder_jax.data.pipeline import DataConfig, Pipeline
from coder_jax.data.fim import FimConfig
cfg = DataConfig(**json.loads(sys.argv[1]), fim=FimConfig(rate=0.5, seed=3))
p = Pipeline(cfg, prefetch=0)
b = next(p)
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "seqio": "seqio" in sys.modules,
                  "batch": {k: v.tolist() for k, v in b.items()}}))
"""


def test_a_second_start_imports_no_tensorflow(corpus, straight, tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XDG_CACHE_HOME=str(tmp_path / "cache"),
             TF_CPP_MIN_LOG_LEVEL="3")
  args = json.dumps(dict(data_dir=corpus["dataset_dir"], tokenizer=corpus["tok"], seq_len=128,
                         batch_size=2, seed=3, long_doc_min_tokens=400, long_doc_factor=3))
  runs = []
  for _ in range(2):
    res = subprocess.run([sys.executable, "-c", _SECOND_START, args], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    runs.append(json.loads(res.stdout.splitlines()[-1]))
  assert runs[0]["tensorflow"] and runs[0]["seqio"]           # the first start made the plan
  assert not runs[1]["tensorflow"] and not runs[1]["seqio"]   # the second only read it
  for r in runs:
    assert _same(straight["batches"][0], {k: np.asarray(v) for k, v in r["batch"].items()})


def test_records_are_read_as_tensorflow_reads_them(corpus):
  import tensorflow as tf
  from coder_jax.data.stream import example_bytes
  files = glob.glob(os.path.join(corpus["dataset_dir"], "*.tfrecord-*"))
  n = 0
  for f in files:
    for rec in tf.data.TFRecordDataset(f).as_numpy_iterator():
      ex = tf.train.Example.FromString(rec)
      assert example_bytes(rec) == {k: v.bytes_list.value[0]
                                    for k, v in ex.features.feature.items()}
      n += 1
  assert n >= 10
  # Other kinds of feature, several values, empty and long values, a key of any text.
  ex = tf.train.Example(features=tf.train.Features(feature={
      "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, -5, 2**40])),
      "floats": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, 2.0])),
      "many": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"first", b"second"])),
      "empty": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""])),
      "long": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x" * 300_000])),
      "ключ ✓": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x00\xff"])),
  }))
  assert example_bytes(ex.SerializeToString()) == {
      "many": b"first", "empty": b"", "long": b"x" * 300_000, "ключ ✓": b"\x00\xff"}
