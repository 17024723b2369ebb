"""Time from a resume to the first batch (and the first trained step): replay vs seek, in one table.

    python benchmarks/data_resume.py [--data_dir runs/data] [--batches 10,100,1000] [--e2e 10,1000]
                                     [--trials 3] [--only_throughput | --no_throughput]

Data (the embedded corpus, built into --data_dir on first use; FIM 0.5; 8 x 256 tokens per
batch as tiny_pretrain.gin): the stream is read straight to the largest N once, keeping its
state at each N; then, per N, a fresh Pipeline
  * replay: a batch-count-only state (what checkpoints held before): the SeqIO stream is made
    again up to batch N, then one batch;
  * seek: the saved position: at most the documents in progress are read again;
and the seek's batch is checked against the straight run's batch N (bit for bit).
End to end (--e2e): the tiny model trains from scratch with a checkpoint at step N and is killed
with SIGKILL after step N+2; a restart is timed from its launch to the log row of step N+1 (the
first resumed step; the losses of steps N+1 and N+2 must equal the killed run's, bit for bit);
and again from the same killed state with the data position cut back to a batch count (an old
checkpoint, so the earlier stream is replayed). Each restart runs `--trials` times, round robin
over every N and both kinds, so load from other work on the machine hits all cases alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from host import cpu_model  # benchmarks/, the script's folder, is on sys.path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from coder_jax.train.metrics import read_metrics  # noqa: E402  (light: no jax, no TF)


def data_table(data_dir: str, ns: list[int], seq_len: int, batch: int) -> list[tuple]:
  import numpy as np
  from coder_jax.data.fim import FimConfig
  from coder_jax.data.pipeline import DataConfig, Pipeline
  from coder_jax.data.prepare import for_training
  dataset_dir, tok = for_training(data_dir, vocab_size=2048)
  cfg = DataConfig(dataset_dir, tok, seq_len=seq_len, batch_size=batch, seed=0,
                   fim=FimConfig(rate=0.5, seed=0))
  straight = Pipeline(cfg, prefetch=0)
  states, want = {}, {}
  t0 = time.perf_counter()
  for n in range(max(ns) + 1):
    if n in ns:
      states[n] = json.loads(json.dumps(straight.state()))
      want[n] = next(straight)
    else:
      next(straight)
  straight_s = time.perf_counter() - t0
  next(Pipeline(cfg, position={"batches": 0}))  # warm: imports, tf.data and SeqIO set-up
  rows = []
  for n in ns:
    old = Pipeline(cfg, position={"batches": n})
    t0 = time.perf_counter()
    next(old)
    replay = time.perf_counter() - t0
    old.close()
    new = Pipeline(cfg, position=states[n])
    t0 = time.perf_counter()
    got = next(new)
    seek = time.perf_counter() - t0
    new.close()
    exact = all(np.array_equal(got[k], want[n][k]) for k in got)
    size = len(json.dumps(states[n]))
    rows.append((n, replay, seek, exact, size))
  return rows, straight_s


def throughput(data_dir: str, seq_len: int = 4096, batch: int = 8, batches: int = 10):
  """Real tokens/s of the seekable stream and of the earlier SeqIO stream (10 batches after the
  first), so the constant-time resume is not bought with a slower stream."""
  from coder_jax.data.fim import FimConfig
  from coder_jax.data.pipeline import DataConfig, Pipeline
  from coder_jax.data.prepare import for_training
  dataset_dir, tok = for_training(data_dir, vocab_size=2048)
  cfg = DataConfig(dataset_dir, tok, seq_len=seq_len, batch_size=batch, seed=0,
                   fim=FimConfig(rate=0.5, seed=0))
  out = {}
  for name, pipe in (("seekable (this)", Pipeline(cfg)),
                     ("SeqIO / tf.data (before)", Pipeline(cfg))):
    if name.startswith("SeqIO"):
      pipe.legacy = True     # the earlier stream, from its start
    next(pipe)
    t0 = time.perf_counter()
    tokens = sum(int((next(pipe)["segment_ids"] > 0).sum()) for _ in range(batches))
    out[name] = tokens / (time.perf_counter() - t0)
    pipe.close()
  return out


def _wait(model_dir, step, proc, timeout=3600):
  """Time at which metrics.jsonl has a row for `step` or later."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(read_metrics(model_dir), default=0) >= step:
      return time.time()
    if proc.poll() is not None:
      raise RuntimeError(f"the run exited ({proc.returncode}) before step {step}")
    time.sleep(0.05)
  raise TimeoutError(step)


def e2e_prepare(data_dir: str, n: int, work: str) -> dict:
  """Trains from scratch with a checkpoint at step n and kills the run (SIGKILL) after step
  n+2; returns how to restart it."""
  model_dir = os.path.join(work, f"run{n}")
  cmd = [sys.executable, "-m", "coder_jax.main", "--gin_file=gin_configs/models/tiny.gin",
         "--gin_file=gin_configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.DATA_DIR='{data_dir}'", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=256",
         "--gin.model_config.vocab_size=2048", "--gin.model_config.moe_impl='tiled'",
         "--gin.model_config.rope_scaling=None", "--gin.pretrain.compute_dtype='float32'",
         "--gin.WARMUP_STEPS=2", f"--gin.pretrain.checkpoint_every={n}",
         f"--gin.TRAIN_STEPS={n + 1000}"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  quiet = dict(cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proc = subprocess.Popen(cmd, **quiet)
  _wait(model_dir, n + 2, proc)
  while not os.path.isdir(os.path.join(model_dir, "checkpoints", str(n), "state")):
    time.sleep(0.05)   # the asynchronous save of step n has finished
  time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed = model_dir + "_killed"
  shutil.copytree(model_dir, killed)
  ckpts = os.path.join(killed, "checkpoints")
  for name in os.listdir(ckpts):   # at N = 10 the next save (step 20) can come before the kill
    if not name.isdigit() or int(name) > n:
      shutil.rmtree(os.path.join(ckpts, name))
  # Same TRAIN_STEPS on restart (the same learning rates), two steps.
  return dict(n=n, model_dir=model_dir, killed=killed, before=read_metrics(model_dir),
              cmd=cmd + ["--gin.pretrain.stop_after=2"], quiet=quiet)


def e2e_restart(run: dict, old: bool) -> tuple[float, bool]:
  """(seconds from launch to the row of step n+1, losses of n+1 and n+2 equal the killed
  run's); old: the data position cut back to a batch count first."""
  n, model_dir = run["n"], run["model_dir"]
  d = model_dir + ("_old" if old else "_new")
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(run["killed"], d)
  if old:
    _cut_to_batch_count(os.path.join(d, "checkpoints", str(n), "data"))
  path = os.path.join(d, "metrics.jsonl")
  with open(path) as fh:   # drop the killed run's rows past n, as the restart will
    keep = [l for l in fh if l.strip() and json.loads(l)["step"] <= n]
  with open(path, "w") as fh:
    fh.writelines(keep)
  t0 = time.time()
  p = subprocess.Popen([x.replace(model_dir, d) for x in run["cmd"]], **run["quiet"])
  t1 = _wait(d, n + 1, p)
  p.wait()
  got = read_metrics(d)
  return t1 - t0, all(got[s]["loss"] == run["before"][s]["loss"] for s in (n + 1, n + 2))


def _cut_to_batch_count(data: str):
  """An old checkpoint: the data position is a batch count only."""
  for name in os.listdir(data):
    path = os.path.join(data, name)
    try:
      with open(path) as fh:
        saved = json.load(fh)
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    if isinstance(saved, dict) and "stream" in saved:
      with open(path, "w") as fh:
        json.dump({"batches": saved["batches"], "tokenizer": saved["tokenizer"]}, fh)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", default=os.path.join(REPO, "runs", "data"))
  ap.add_argument("--batches", default="10,100,1000")
  ap.add_argument("--e2e", default="10,1000", help="steps N of the kill -9 runs; '' skips")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--only_throughput", action="store_true")
  ap.add_argument("--no_throughput", action="store_true")
  ap.add_argument("--trials", type=int, default=3, help="restarts per case (--e2e)")
  args = ap.parse_args(argv)
  ns = [int(x) for x in args.batches.split(",") if x]
  import jax
  import seqio
  import tensorflow as tf
  print(f"# {cpu_model()}, {os.cpu_count()} cores; jax "
        f"{jax.__version__}, tensorflow {tf.__version__}, seqio {seqio.__version__}")
  if args.only_throughput:
    ns, args.e2e = [], ""
  rows, straight_s = data_table(args.data_dir, ns, args.seq_len, args.batch) if ns else ([], 0)
  if ns:
    print(f"\nstraight read to batch {max(ns)}: {straight_s:.1f} s "
          f"({args.batch} x {args.seq_len} tokens per batch, FIM 0.5)\n")
    print("| resume at batch N | replay (batch count, before) s | seek (saved position) s | "
          "speed-up | seek bit-exact | position JSON bytes |")
    print("|---|---|---|---|---|---|")
  for n, replay, seek, exact, size in rows:
    print(f"| {n:,} | {replay:.2f} | {seek:.3f} | {replay / seek:.0f}x | {exact} | {size} |")
  rates = {} if args.no_throughput else throughput(args.data_dir)
  if rates:
    print("\n| stream, seq 4096, batch 8, FIM 0.5 | real tokens/s |")
    print("|---|---|")
  for name, r in rates.items():
    print(f"| {name} | {r:,.0f} |")
  if args.e2e:
    work = tempfile.mkdtemp(prefix="data_resume_")
    runs = [e2e_prepare(args.data_dir, int(x), work) for x in args.e2e.split(",") if x]
    times = {(r["n"], old): [] for r in runs for old in (False, True)}
    exact = {r["n"]: True for r in runs}
    for _ in range(args.trials):   # round robin: load from other work hits every case alike
      for r in runs:
        for old in (False, True):
          dt, same = e2e_restart(r, old)
          times[r["n"], old].append(dt)
          exact[r["n"]] &= same or old   # the replayed stream differs from the seekable one
    print(f"\n| kill -9 after step N, restart | to first resumed step, seek s (min / median of "
          f"{args.trials}) | same from a batch-count-only checkpoint (replay) s | losses N+1, "
          "N+2 bit-exact (seek) |")
    print("|---|---|---|---|")
    for r in runs:
      n = r["n"]
      seek, replay = sorted(times[n, False]), sorted(times[n, True])
      mid = len(seek) // 2
      print(f"| {n:,} | {seek[0]:.1f} / {seek[mid]:.1f} | {replay[0]:.1f} / {replay[mid]:.1f} "
            f"| {exact[n]} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
  main()
