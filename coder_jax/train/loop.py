"""One training loop for every stage (pretraining, SFT, the reward model, GRPO, long context).

A stage brings the model config, an Objective (train/step.py), a stream of host-local numpy
batches, and where the weights start (a seed, a Hugging Face checkpoint, or another run's
MODEL_DIR). Every stage then gets the same behaviour:
- checkpoints every N steps (Orbax, asynchronous); a start resumes from the newest step that
  restores, skipping damaged ones; SIGTERM or Ctrl-C saves after the current step and exits;
- a step whose loss or gradient is not finite is skipped and counted; after N in a row the run
  stops naming the last good checkpoint;
- metrics fetched one step late: step s+1 is dispatched before step s's metrics are read, so the
  host never waits on the device to log (a save point reads its own step first);
- MODEL_DIR/config.gin holds the run's gin config (t5x convention), MODEL_DIR/tokenizer.json
  the tokenizer its batches were made with.

The stream protocol: `next(stream)` -> dict of numpy arrays [rows, ...] (this host's rows);
`stream.state()` -> JSON-able position saved with each checkpoint (with "batches", the count);
optional `stream.seek(saved)` to continue from it (else `open(start_batch=...)` alone); optional
`stream.tokenizer_path`; a stream with `needs_state = True` is asked `stream.next_with(state)`
instead (on-policy sampling reads the current parameters); optional `stream.host_metrics()`
-> {name: number} measured on the host for the batch just given (rewards, sampling time), logged
with its step.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.files import write_atomic
from coder_jax.model.config import ConfigError, YarnConfig, get_config
from coder_jax.model.decoder import DeepseekV2
from coder_jax.parallel.distributed import host_rows, place_rows
from coder_jax.parallel.rules import logical_to_spec
from coder_jax.train import state as train_state
from coder_jax.train.checkpoint import (Checkpointer, PreemptionGuard, load_params,
                                        read_model_config, record_tokenizer)
from coder_jax.train.flops import peak_flops_per_device
from coder_jax.train.metrics import MetricsLog, Progress
from coder_jax.train.step import TOKEN_AXES

# ModelConfig fields a run config may set on top of an architecture read from a checkpoint.
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "moe_impl",
                  "routing_devices", "routing_device_limit", "capacity_factor", "capacity_rule",
                  "capacity_guard_fraction", "dispatch_headroom")


# The fields a stage may change on top of the architecture it continues from: where its
# positions reach. A long-context stage extends RoPE with YaRN and raises the limit; the weights
# fit either way, so nothing but an explicit statement should change them.
POSITION_FIELDS = ("rope_scaling", "max_position_embeddings")


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def position_overrides(overrides) -> dict:
  """`model_overrides` checked: exactly POSITION_FIELDS (a new rope scaling and the limit it
  reaches are stated together), rope_scaling as a YarnConfig (gin gives a dict) or None."""
  if not overrides:
    return {}
  names = ", ".join(POSITION_FIELDS)
  unknown = sorted(set(overrides) - set(POSITION_FIELDS))
  if unknown:
    raise ConfigError(f"model_overrides: {unknown[0]} cannot be overridden (only {names}: the "
                      "architecture comes from the checkpoint a run starts from or from "
                      "model_config)")
  missing = [f for f in POSITION_FIELDS if f not in overrides]
  if missing:
    raise ConfigError(f"model_overrides: state {names} together (missing {missing[0]}); a new "
                      "rope scaling and the length it reaches go together")
  out = dict(overrides)
  y = out["rope_scaling"]
  if isinstance(y, dict):
    known = {f.name for f in dataclasses.fields(YarnConfig)}
    bad = sorted(set(y) - known)
    if bad:
      raise ConfigError(f"model_overrides: rope_scaling.{bad[0]} is not a YaRN field "
                        f"({', '.join(sorted(known))})")
    out["rope_scaling"] = YarnConfig(**y)
  elif y is not None and not isinstance(y, YarnConfig):
    raise ConfigError(f"model_overrides: rope_scaling must be a dict of YaRN fields or None, "
                      f"got {y!r}")
  m = out["max_position_embeddings"]
  if not isinstance(m, int) or isinstance(m, bool) or m < 1:
    raise ConfigError(f"model_overrides: max_position_embeddings must be a positive int, got "
                      f"{m!r}")
  return out


def check_positions(cfg, seq_len: int, source: str | None = None):
  """A training sequence must fit the positions the model is configured for."""
  if seq_len > cfg.max_position_embeddings:
    where = f" (the config of {source})" if source else ""
    raise ConfigError(
        f"seq_len={seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
        f"{where}; a stage that trains longer sequences states the new limit and its rope "
        "scaling in model_overrides (see gin_configs/runs/long_context.gin)")


def resolve_model_config(init_from_hf: str | None, compute_dtype: str,
                         init_from_checkpoint: str | None = None, init_step: int | None = None,
                         dry_run: bool = False, model_overrides: dict | None = None):
  """The gin model config, or the architecture of the checkpoint a run starts from (HF
  config.json or another run's stored config) with the gin runtime fields; master weights are
  always float32. A dry run whose checkpoint is not on this machine uses the gin config.

  model_overrides: {'rope_scaling': {YaRN fields} or None, 'max_position_embeddings': n}, both
  or neither; applied last, whatever the source (the only way a stage changes them)."""
  if init_from_hf and init_from_checkpoint:
    raise ValueError("init_from_hf and init_from_checkpoint: set one, not both")
  positions = position_overrides(model_overrides)
  gin_cfg = get_config()
  runtime = {f: getattr(gin_cfg, f) for f in RUNTIME_FIELDS}
  runtime.update(dtype=compute_dtype, param_dtype="float32", **positions)
  source = init_from_hf or init_from_checkpoint
  if dry_run and source and not os.path.exists(source):
    print(f"note: {source} is not on this machine; the dry run uses gin's model_config",
          flush=True)
    return gin_cfg.replace(**runtime)
  if init_from_hf:
    from coder_jax import hf
    return hf.load_config(init_from_hf, **runtime)
  if init_from_checkpoint:
    return read_model_config(init_from_checkpoint, init_step, **runtime)[0]
  return gin_cfg.replace(**runtime)


def initial_params(cfg, mesh, *, init_from_hf=None, init_from_checkpoint=None, init_step=None):
  """Parameters (a pure dict placed on the mesh) a fresh run starts from; None: from the seed.
  The source is read as `cfg` states it (runtime and position fields included)."""
  keep = RUNTIME_FIELDS + POSITION_FIELDS
  if init_from_hf:
    from coder_jax import hf
    loaded = hf.load(init_from_hf, jnp.float32, mesh=mesh, compute_dtype=cfg.dtype,
                     **{f: getattr(cfg, f) for f in keep if f != "dtype"})
    print(f"initialised from {init_from_hf}", flush=True)
  elif init_from_checkpoint:
    loaded, step = load_params(init_from_checkpoint, init_step, mesh=mesh,
                               **{f: getattr(cfg, f) for f in keep})
    print(f"initialised from step {step} of {init_from_checkpoint}", flush=True)
  else:
    return None
  return nnx.to_pure_dict(nnx.state(loaded, nnx.Param))


def check_model_dir(model_dir: str):
  """MODEL_DIR must be a directory this process can write (root ignores permission bits, so
  this writes a probe file rather than asking os.access)."""
  import tempfile
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ValueError(f"MODEL_DIR: {model_dir} exists and is not a directory")
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=model_dir):
      pass
  except OSError as e:
    raise ValueError(f"MODEL_DIR: cannot write to {model_dir} ({e.strerror})") from None


def write_gin_config(model_dir: str):
  """MODEL_DIR/config.gin: every binding of this run (written atomically by the first host)."""
  if jax.process_index() != 0:
    return
  write_atomic(os.path.join(model_dir, "config.gin"), gin.config_str())


def log_values(m: dict, step_time: float, tokens_per_step: int, flops_per_token: float | None,
               peak: float | None, num_devices: int) -> dict:
  """One metrics row: every scalar of the step, rates, MFU, and per-layer expert load."""
  v = {}
  for k, x in m.items():
    a = np.asarray(x)
    if k == "expert_load":
      if a.size:
        v["expert_load_max"] = float(a.max() * a.shape[-1])  # 1.0 = perfectly balanced
        v["expert_load"] = [[round(float(y), 5) for y in row] for row in a]
    elif a.ndim == 0:
      v[k] = int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
  v["lr"] = v.get("learning_rate")
  v["step_time_s"] = step_time
  v["tokens_per_s"] = tokens_per_step / step_time
  if "tokens" in v:
    v["real_tokens_per_s"] = v["tokens"] / step_time
  if peak and flops_per_token:
    v["mfu"] = flops_per_token * tokens_per_step / step_time / (peak * num_devices)
  return v


def run(*, model_dir: str, cfg, optimizer, schedule, mesh, objective, data, batch_size: int,
        seq_len: int, train_steps: int, make_step: Callable, seed: int = 0,
        params: Callable | None = None, model_cls=DeepseekV2, checkpoint_every: int = 100,
        keep_checkpoints: int | None = 3, async_checkpoints: bool = True, log_every: int = 1,
        max_consecutive_nonfinite: int = 5, nan_injection_steps: tuple = (),
        flops_per_token: float | None = None, peak_tflops_per_device: float | None = None,
        stop_after: int | None = None, evaluate: Callable | None = None,
        progress_every_s: float = 30.0) -> dict:
  """Train until `train_steps`, resuming from MODEL_DIR's newest intact checkpoint.

  make_step(graphdef) -> the (unjitted) train step; params() -> the initial parameters of a
  fresh run (None: from `seed`), called only when there is nothing to resume. evaluate(graphdef,
  state) -> {name: number}: held-out metrics, logged (as eval_<name>) at every checkpoint.
  progress_every_s: how often the progress line is printed when stderr is a file or a pipe (on
  a terminal it is rewritten at every logged step)."""
  if train_steps < 1 or checkpoint_every < 1:
    raise ValueError("train_steps and checkpoint_every must be >= 1")
  # The rows this host feeds: with the batch split over fewer groups than hosts (a context or
  # tensor axis spanning hosts), hosts holding the same rows load the same rows. host_rows
  # refuses a layout whose blocks are not equal, so the blocks divide the batch.
  host_block = batch_rows_of_host(mesh, batch_size, seq_len)
  check_model_dir(model_dir)
  write_gin_config(model_dir)
  ckpt = Checkpointer(model_dir, every=checkpoint_every, keep=keep_checkpoints,
                      async_save=async_checkpoints)
  try:
    return _run(
        ckpt, model_dir=model_dir, cfg=cfg, optimizer=optimizer, mesh=mesh, objective=objective,
        data=data, batch_size=batch_size, seq_len=seq_len, host_block=host_block,
        train_steps=train_steps,
        make_step=make_step, seed=seed, params=params, model_cls=model_cls,
        checkpoint_every=checkpoint_every, log_every=log_every,
        max_consecutive_nonfinite=max_consecutive_nonfinite,
        nan_injection_steps=nan_injection_steps, flops_per_token=flops_per_token,
        peak_tflops_per_device=peak_tflops_per_device, stop_after=stop_after,
        evaluate=evaluate, progress_every_s=progress_every_s)
  finally:
    ckpt.close()   # also on errors: an open async manager buries them in shutdown noise


def batch_rows_of_host(mesh, batch_size: int, seq_len: int) -> tuple[int, int, int]:
  """(shard, num_shards, first row) of the token rows this host feeds (`host_rows`)."""
  shape = (batch_size, seq_len)
  return host_rows(NamedSharding(mesh, logical_to_spec(TOKEN_AXES, shape, mesh)), shape)


def jit_step(step, shardings, mesh):
  """The train step jitted as every run (and --compile_topology) runs it: the state in its
  shardings and donated, the batch as placed, the metrics replicated."""
  return jax.jit(step, in_shardings=(shardings, None),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def _run(ckpt, *, model_dir, cfg, optimizer, mesh, objective, data, batch_size, seq_len,
         host_block, train_steps, make_step, seed, params, model_cls, checkpoint_every,
         log_every, max_consecutive_nonfinite, nan_injection_steps, flops_per_token,
         peak_tflops_per_device, stop_after, evaluate, progress_every_s) -> dict:
  primary = jax.process_index() == 0
  graphdef, abstract, specs = train_state.state_specs(cfg, optimizer, mesh, model_cls)
  shardings = train_state.to_shardings(specs, mesh)
  with jax.set_mesh(mesh):
    restored = ckpt.restore_latest(abstract, shardings, cfg)
    latest = None if restored is None else restored[0]
    if restored is not None:
      _, state, data_pos = restored
      start_batch = int(data_pos["batches"])
      print(f"restored step {latest} from {ckpt.directory}", flush=True)
    else:
      init = params() if params else None
      _, state, _ = train_state.init_state(cfg, optimizer, mesh, seed=seed, params=init,
                                           model_cls=model_cls)
      start_batch = 0
  start = int(jax.device_get(state["step"]))
  shard, num_shards, first_row = host_block
  stream = data.open(model_vocab=cfg.vocab_size, batch_rows=batch_size // num_shards,
                     seq_len=seq_len, shard=shard, num_shards=num_shards,
                     start_batch=start_batch)
  if restored is not None and hasattr(stream, "seek"):   # constant-time resume (data/stream.py)
    stream.seek(data_pos)
  tok_path = getattr(stream, "tokenizer_path", None)
  record = {}
  if tok_path:
    record["tokenizer"] = record_tokenizer(model_dir, tok_path, resumed=latest is not None)
  placement = {}

  def place(key, local):
    """The global array of this host's rows of `key`, laid out by the objective's axes."""
    shape = (local.shape[0] * num_shards,) + local.shape[1:]
    if key not in placement:
      placement[key] = NamedSharding(mesh, logical_to_spec(objective.batch_axes[key], shape,
                                                           mesh))
      if host_rows(placement[key], shape) != (shard, num_shards, first_row):
        raise ValueError(f"batch key {key!r} {shape} is laid out over other hosts' rows than "
                         "the tokens are")
    return place_rows(placement[key], shape, local, first_row)

  step_fn = jit_step(make_step(graphdef), shardings, mesh)
  peak = (peak_tflops_per_device * 1e12 if peak_tflops_per_device
          else peak_flops_per_device())
  log = MetricsLog(model_dir, enabled=primary, resume_step=start)
  tokens_per_step = batch_size * seq_len
  poison = set(int(s) for s in nan_injection_steps)
  progress = None  # made after the first step, so compile time does not skew the ETA
  consecutive, losses, step, last_saved, reason = 0, {}, start, latest, "done"
  pending = None      # (step, metrics on device) of the step dispatched last
  t_prev = time.perf_counter()

  def say(text):
    """A line of its own on the first host's stderr, clear of the progress line."""
    if progress is not None:
      progress.message(text)
    elif primary:
      print(text, file=sys.stderr, flush=True)

  def settle():
    """Reads the pending step's metrics (waiting for it), logs them, updates the streak."""
    nonlocal pending, consecutive, t_prev, progress
    if pending is None:
      return
    s, m, host = pending
    pending = None
    m = jax.device_get(m)
    now = time.perf_counter()
    dt, t_prev = now - t_prev, now
    v = log_values(m, dt, tokens_per_step, flops_per_token, peak, jax.device_count())
    v.update(host)
    losses[s] = v["loss"]
    if progress is None:
      progress = Progress(train_steps, start_step=s, stream=sys.stderr if primary else _Null(),
                          every_s=progress_every_s)
    if v["skipped"]:
      consecutive += 1
      say(f"step {s}: non-finite loss/gradient ({v['loss']}); update skipped "
          f"({consecutive} in a row)")
    else:
      consecutive = 0
    if s % log_every == 0 or s == train_steps:
      log.write(s, v)
      progress.update(s, v)

  # The guard stays installed through the final checkpoint wait: a second SIGTERM cannot cut it.
  guard = PreemptionGuard(ckpt.manager).__enter__()
  try:
    with jax.set_mesh(mesh):
      while step < train_steps:
        local = (stream.next_with(state) if getattr(stream, "needs_state", False)
                 else next(stream))
        host = stream.host_metrics() if hasattr(stream, "host_metrics") else {}
        batch = {k: place(k, v) for k, v in local.items() if k in objective.batch_axes}
        if poison:
          batch["nan_poison"] = jax.device_put(
              np.float32(np.nan if step + 1 in poison else 0.0), NamedSharding(mesh, P()))
        state, m = step_fn(state, batch)
        settle()    # the previous step's metrics, read while this one runs
        step += 1
        pending = (step, m, host)
        if consecutive >= max_consecutive_nonfinite:
          reason = "nonfinite"
          break
        stop = guard.requested(step)
        done_here = stop_after is not None and step - start >= stop_after
        forced = stop or done_here or step == train_steps
        if forced or step % checkpoint_every == 0:
          if evaluate is not None:   # logged in this step's row
            scores = {f"eval_{k}": float(v) for k, v in evaluate(graphdef, state).items()}
            pending[2].update(scores)
            say(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
          settle()   # a save point needs this step's verdict
          if consecutive >= max_consecutive_nonfinite:
            reason = "nonfinite"
            break
          # Periodic saves wait out a non-finite streak so rotation keeps the last good one; a
          # forced save is safe within it (skipped updates left parameters and optimizer alone).
          if forced or consecutive == 0:
            if ckpt.save(step, state, {**stream.state(), **record}, cfg, force=forced,
                         data_shard=(shard, num_shards)):
              last_saved = step
        if stop:
          reason = "preempted"
          break
        if done_here:
          reason = "stop_after"
          break
      settle()
      if reason == "done" and consecutive >= max_consecutive_nonfinite:
        reason = "nonfinite"
  finally:
    if progress is not None:
      progress.close()
    if hasattr(stream, "close"):
      stream.close()
    log.close()
    ckpt.close()
    guard.__exit__(None, None, None)
  if reason == "preempted":
    print(f"{guard.signal_name or 'SIGTERM'}: saved checkpoint at step {last_saved} in "
          f"{ckpt.directory}", flush=True)
  if reason == "nonfinite":
    raise NonFiniteLossError(
        f"stopping at step {step}: {consecutive} consecutive steps with a non-finite loss or "
        f"gradient (limit max_consecutive_nonfinite={max_consecutive_nonfinite}); the last "
        f"good checkpoint is step {last_saved} in {ckpt.directory}")
  if primary and reason == "done":
    print(f"finished step {step}; checkpoint in {ckpt.directory}", flush=True)
  return {"step": step, "losses": losses, "reason": reason, "checkpoint_dir": ckpt.directory,
          "last_checkpoint": last_saved, "model_config": cfg}


class _Null:
  def write(self, *_):
    pass

  def flush(self):
    pass

  def isatty(self):
    return False
