"""Pretraining (and continued pretraining from a Hugging Face checkpoint) on a device mesh.

Wires the pieces of `coder_jax.train` together; gin picks every value (gin_configs/runs/
pretrain.gin). Returns a summary dict (used by tests); writes checkpoints, metrics.jsonl and
TensorBoard events under MODEL_DIR.
"""

from __future__ import annotations

import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.model.config import get_config
from coder_jax.model.info import param_counts
from coder_jax.parallel.mesh import MeshConfig, abstract_mesh, check_fit, make_mesh
from coder_jax.parallel.rules import logical_to_spec
from coder_jax.train import state as train_state
from coder_jax.train.checkpoint import Checkpointer, PreemptionGuard, record_tokenizer
from coder_jax.train.data import SyntheticData
from coder_jax.train.flops import peak_flops_per_device, train_flops_per_token
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.metrics import MetricsLog, Progress
from coder_jax.train.optim import OptimizerConfig, make_optimizer
from coder_jax.train.step import make_train_step

RUNTIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "moe_impl",
                  "routing_devices", "routing_device_limit", "capacity_factor")


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def resolve_model_config(init_from_hf: str | None, compute_dtype: str):
  """The gin model config, or the HF checkpoint's architecture with the gin runtime fields;
  master weights are always float32."""
  gin_cfg = get_config()
  runtime = {f: getattr(gin_cfg, f) for f in RUNTIME_FIELDS}
  runtime.update(dtype=compute_dtype, param_dtype="float32")
  if init_from_hf:
    from coder_jax import hf
    return hf.load_config(init_from_hf, **runtime)
  return gin_cfg.replace(**runtime)


def check_balance(cfg, alphas: BalanceLossConfig):
  """The device-level and communication losses need device groups to balance."""
  if cfg.has_moe and cfg.routing_devices == 1 and (alphas.device_alpha or alphas.comm_alpha):
    raise ValueError(
        "balance_loss: device_alpha / comm_alpha are set but model_config.routing_devices is 1, "
        "so both losses would be constants; set routing_devices to the expert-parallel device "
        "count (or a multiple of it) or the alphas to 0")


def _gb(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB"


def dry_run_report(cfg, mesh_cfg: MeshConfig, optimizer, *, num_devices: int, batch_size: int,
                   seq_len: int, grad_accum_steps: int) -> dict:
  mesh = abstract_mesh(mesh_cfg, num_devices)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
  _, abstract, specs = train_state.state_specs(cfg, optimizer, mesh)
  shape = dict(mesh.shape)
  p_bytes = train_state.bytes_per_device(abstract["params"], specs["params"], shape)
  o_bytes = train_state.bytes_per_device(abstract["opt_state"], specs["opt_state"], shape)
  counts = param_counts(cfg)
  report = {"total_params": counts["total"], "active_params": counts["active"],
            "mesh": shape, "num_devices": num_devices, "params_bytes_per_device": p_bytes,
            "opt_state_bytes_per_device": o_bytes, "state_bytes_per_device": p_bytes + o_bytes,
            "train_flops_per_token": train_flops_per_token(cfg, seq_len)}
  lines = [
      f"model                {counts['total'] / 1e9:,.2f}B parameters, "
      f"{counts['active'] / 1e9:,.2f}B active per token; compute {cfg.dtype}, master float32",
      f"mesh                 {' '.join(f'{k}={v}' for k, v in shape.items())} "
      f"({num_devices} devices)",
      f"batch                {batch_size} x {seq_len} tokens "
      f"({grad_accum_steps} micro-batch{'es' if grad_accum_steps > 1 else ''})",
      f"per device           parameters {_gb(p_bytes)} + optimizer state {_gb(o_bytes)} = "
      f"{_gb(p_bytes + o_bytes)} (float32; activations not included)",
      f"train FLOPs / token  {report['train_flops_per_token'] / 1e9:,.2f} GFLOP",
  ]
  print("\n".join(lines))
  return report


def _log_values(m: dict, step_time: float, tokens_per_step: int, flops_per_token: float,
                peak: float | None, num_devices: int) -> dict:
  v = {k: float(m[k]) for k in ("loss", "ce_loss", "expert_balance", "device_balance",
                                "comm_balance", "grad_norm", "learning_rate")}
  v["lr"] = v["learning_rate"]
  v["step_time_s"] = step_time
  v["tokens_per_s"] = tokens_per_step / step_time
  v["real_tokens_per_s"] = float(m["tokens"]) / step_time
  if peak:
    v["mfu"] = flops_per_token * tokens_per_step / step_time / (peak * num_devices)
  v["skipped"] = int(m["skipped"])
  load = np.asarray(m["expert_load"])
  if load.size:
    v["expert_load_max"] = float(load.max() * load.shape[-1])  # 1.0 = perfectly balanced
    v["expert_load"] = [[round(float(x), 5) for x in row] for row in load]
  return v


@gin.configurable
def pretrain(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
             batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED,
             data=SyntheticData(), mesh_config: MeshConfig | None = None,
             optimizer_config: OptimizerConfig | None = None,
             balance_loss: BalanceLossConfig | None = None, grad_accum_steps: int = 1,
             compute_dtype: str = "bfloat16", seed: int = 0, init_from_hf: str | None = None,
             checkpoint_every: int = 100, keep_checkpoints: int | None = 3,
             async_checkpoints: bool = True, log_every: int = 1,
             max_consecutive_nonfinite: int = 5, nan_injection_steps: tuple = (),
             peak_tflops_per_device: float | None = None, dry_run: bool = False,
             dry_run_devices: int | None = None, stop_after: int | None = None):
  """Train until `train_steps` (resuming from the latest checkpoint in MODEL_DIR).

  stop_after: leave after this many steps of this process (a checkpoint is saved), e.g. to
  split a long run into jobs. nan_injection_steps: steps whose loss is made NaN (tests the
  non-finite guard)."""
  mesh_cfg = mesh_config or MeshConfig()
  opt_cfg = optimizer_config or OptimizerConfig()
  alphas = balance_loss or BalanceLossConfig()
  cfg = resolve_model_config(init_from_hf, compute_dtype)
  optimizer, schedule = make_optimizer(opt_cfg, train_steps)
  if dry_run:
    check_balance(cfg, alphas)
    return dry_run_report(cfg, mesh_cfg, optimizer, num_devices=dry_run_devices or jax.device_count(),
                          batch_size=batch_size, seq_len=seq_len, grad_accum_steps=grad_accum_steps)
  if train_steps < 1 or checkpoint_every < 1:
    raise ValueError("pretrain: train_steps and checkpoint_every must be >= 1")
  mesh = make_mesh(mesh_cfg)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps)
  check_balance(cfg, alphas)
  primary = jax.process_index() == 0
  nproc = jax.process_count()
  if batch_size % nproc:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {nproc} hosts")
  check_model_dir(model_dir)
  ckpt = Checkpointer(model_dir, every=checkpoint_every, keep=keep_checkpoints,
                      async_save=async_checkpoints)
  try:
    return _train(ckpt, cfg, optimizer, schedule, mesh, model_dir=model_dir,
                  train_steps=train_steps, batch_size=batch_size, seq_len=seq_len, data=data,
                  alphas=alphas, grad_accum_steps=grad_accum_steps, seed=seed,
                  init_from_hf=init_from_hf, checkpoint_every=checkpoint_every,
                  log_every=log_every, max_consecutive_nonfinite=max_consecutive_nonfinite,
                  nan_injection_steps=nan_injection_steps,
                  peak_tflops_per_device=peak_tflops_per_device, stop_after=stop_after)
  finally:
    ckpt.close()   # also on errors: an open async manager buries them in shutdown noise


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


def _train(ckpt, cfg, optimizer, schedule, mesh, *, model_dir, train_steps, batch_size, seq_len,
           data, alphas, grad_accum_steps, seed, init_from_hf, checkpoint_every, log_every,
           max_consecutive_nonfinite, nan_injection_steps, peak_tflops_per_device, stop_after):
  primary = jax.process_index() == 0
  nproc = jax.process_count()
  graphdef, abstract, specs = train_state.state_specs(cfg, optimizer, mesh)
  shardings = train_state.to_shardings(specs, mesh)
  with jax.set_mesh(mesh):
    restored = ckpt.restore_latest(abstract, shardings, cfg)
    latest = None if restored is None else restored[0]
    if restored is not None:
      _, state, data_pos = restored
      start_batch = int(data_pos["batches"])
      print(f"restored step {latest} from {ckpt.directory}", flush=True)
    else:
      params = None
      if init_from_hf:
        from coder_jax import hf
        loaded = hf.load(init_from_hf, jnp.float32, mesh=mesh, compute_dtype=cfg.dtype,
                         **{f: getattr(cfg, f) for f in RUNTIME_FIELDS if f != "dtype"})
        params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
        print(f"initialised from {init_from_hf}", flush=True)
      _, state, _ = train_state.init_state(cfg, optimizer, mesh, seed=seed, params=params)
      start_batch = 0
  start = int(jax.device_get(state["step"]))
  stream = data.open(model_vocab=cfg.vocab_size, batch_rows=batch_size // nproc, seq_len=seq_len,
                     shard=jax.process_index(), num_shards=nproc, start_batch=start_batch)
  tok_path = getattr(stream, "tokenizer_path", None)
  data_record = {}
  if tok_path:
    data_record["tokenizer"] = record_tokenizer(model_dir, tok_path, resumed=latest is not None)
  batch_spec = logical_to_spec(("batch", "activation_length"), (batch_size, seq_len), mesh)
  batch_sharding = NamedSharding(mesh, batch_spec)
  step_fn = jax.jit(make_train_step(graphdef, cfg, optimizer, schedule, alphas=alphas,
                                    grad_accum_steps=grad_accum_steps),
                    in_shardings=(shardings, None),
                    out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  flops_per_token = train_flops_per_token(cfg, seq_len)
  peak = peak_tflops_per_device * 1e12 if peak_tflops_per_device else peak_flops_per_device()
  log = MetricsLog(model_dir, enabled=primary, resume_step=start)
  progress = None  # made after the first step, so compile time does not skew the ETA
  poison = set(int(s) for s in nan_injection_steps)
  consecutive, losses, step = 0, {}, start
  last_saved = latest
  reason = "done"
  t_prev = time.perf_counter()
  # The guard stays installed through the final checkpoint wait: a second SIGTERM cannot cut it.
  guard = PreemptionGuard().__enter__()
  try:
    with jax.set_mesh(mesh):
      while step < train_steps:
        local = next(stream)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                 for k, v in local.items()}
        if poison:
          batch["nan_poison"] = jax.device_put(
              np.float32(np.nan if step + 1 in poison else 0.0), NamedSharding(mesh, P()))
        state, m = step_fn(state, batch)
        m = jax.device_get(m)
        step += 1
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        v = _log_values(m, dt, batch_size * seq_len, flops_per_token, peak, jax.device_count())
        v["nonfinite_total"] = int(jax.device_get(state["nonfinite"]))
        losses[step] = v["loss"]
        if v["skipped"]:
          consecutive += 1
          print(f"\nstep {step}: non-finite loss/gradient ({v['loss']}); update skipped "
                f"({consecutive} in a row)", file=sys.stderr, flush=True)
        else:
          consecutive = 0
        if progress is None:
          progress = Progress(train_steps, start_step=step,
                              stream=sys.stderr if primary else _Null())
        if step % log_every == 0 or step == train_steps:
          log.write(step, v)
          progress.update(step, v)
        if consecutive >= max_consecutive_nonfinite:
          reason = "nonfinite"
          break
        stop = guard.requested()
        done_here = stop_after is not None and step - start >= stop_after
        forced = stop or done_here or step == train_steps
        # Periodic saves wait out a non-finite streak so rotation keeps the last good one; a
        # forced save is safe within it (skipped updates left parameters and optimizer alone).
        if forced or (consecutive == 0 and step % checkpoint_every == 0):
          if ckpt.save(step, state, {"batches": stream.state()["batches"], **data_record}, cfg,
                       force=forced):
            last_saved = step
        if stop:
          reason = "preempted"
          break
        if done_here:
          reason = "stop_after"
          break
  finally:
    if progress is not None:
      progress.close()
    log.close()
    ckpt.close()
    guard.__exit__(None, None, None)
  if reason == "preempted":
    print(f"{guard.signal_name or 'SIGTERM'}: saved checkpoint at step {last_saved} in "
          f"{ckpt.directory}", flush=True)
  if reason == "nonfinite":
    raise NonFiniteLossError(
        f"stopping at step {step}: {consecutive} consecutive steps with a non-finite loss or "
        f"gradient (limit max_consecutive_nonfinite={max_consecutive_nonfinite}); the last good "
        f"checkpoint is step {last_saved} in {ckpt.directory}")
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
