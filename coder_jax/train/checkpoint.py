"""Training checkpoints with Orbax's CheckpointManager: asynchronous saves every N steps, the
last K kept, the latest restored on start (onto whatever mesh the run has now), and a save on
SIGTERM. A checkpoint holds the train state (step, parameters, optimizer state, RNG, non-finite
count), the data position and the model config, so a run resumes exactly and a checkpoint can be
exported to the Hugging Face format without the gin files.

    <model_dir>/checkpoints/<step>/{state, data, model_config}
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp

from coder_jax.files import write_atomic
from coder_jax.model.config import (ConfigError, computation_diff, config_from_dict,
                                     config_to_dict)
from coder_jax.model.decoder import DeepseekV2

CHECKPOINT_SUBDIR = "checkpoints"
TOKENIZER_NAME = "tokenizer.json"   # the run's tokenizer, copied into MODEL_DIR


ITEMS = ("state", "data", "model_config")
DAMAGED_SUBDIR = "checkpoints_damaged"


class CheckpointDamagedError(ValueError):
  """No checkpoint of a run restores (or the step asked for does not)."""


def _reason(e: BaseException) -> str:
  """The innermost cause's message, on one line: Orbax and tensorstore wrap the real error."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _stored_config(manager, step: int, **runtime):
  d = manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
  return config_from_dict(dict(d["model_config"]), **runtime)


def _newest_that_restores(manager, directory: str, step: int | None, restore, log):
  """(step, restore(step)) for `step`, or for the newest step that restores, skipping (and
  naming) damaged ones. `restore` raises ConfigError for a checkpoint that is intact but does
  not belong to this run; that is never a reason to fall back."""
  if step is not None:
    if step not in manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps: "
                              f"{sorted(manager.all_steps()) or 'none'})")
    try:
      return step, restore(step)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 -- any failure to read the files means damage
      raise CheckpointDamagedError(f"{directory}: checkpoint step {step} is damaged "
                                   f"({_reason(e)})") from None
  damaged = []
  for s in sorted(manager.all_steps(), reverse=True):
    try:
      out = restore(s)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001
      damaged.append(s)
      log(f"checkpoint step {s} in {directory} is damaged ({_reason(e)}); skipped, trying an "
          "earlier step")
      continue
    return s, out
  if damaged:
    raise CheckpointDamagedError(
        f"{directory}: no checkpoint restores (damaged steps: {', '.join(map(str, damaged))}); "
        "move them away to start afresh")
  return None, None


def gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (two small all-gathers)."""
  import json
  import numpy as np
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]


def _stderr(msg: str):
  print(msg, file=sys.stderr, flush=True)


class Checkpointer:
  def __init__(self, model_dir: str, *, every: int, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    self.every = every
    opts = ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep,
                                        enable_async_checkpointing=async_save, create=True,
                                        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, model_cfg, *, force: bool = False,
           data_shard: tuple[int, int] | None = None) -> bool:
    """Every process calls this at the same steps. With several processes each data shard's
    position is kept (under "hosts", in shard order): their streams differ. data_shard: this
    process's (shard, num_shards) of the data (default: its process index of the count);
    processes feeding the same shard hold the same position."""
    if jax.process_count() > 1:
      shard, n = data_shard or (jax.process_index(), jax.process_count())
      hosts = [None] * n
      for s, position in gather_json([shard, data_state]):
        hosts[s] = position
      data_state = {**data_state, "hosts": hosts}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        model_config=ocp.args.JsonSave(config_to_dict(model_cfg))), force=force)

  def restore(self, step: int, abstract_state, shardings):
    """(state placed by `shardings`, data position dict) of checkpoint `step`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state, shardings, model_cfg, log=_stderr):
    """(step, state, data position) of the newest checkpoint that restores, or None when there
    is none. Damaged newer steps are named and moved to MODEL_DIR/checkpoints_damaged/ (kept,
    never deleted) so that this run can save those step numbers again. A checkpoint of another
    model (a field that changes the computation differs) is an error naming the fields."""

    def restore(step):
      diff = computation_diff(_stored_config(self.manager, step), model_cfg)
      if diff:
        raise ConfigError(f"{self.directory}: checkpoint step {step} was trained with another "
                          f"model config ({'; '.join(diff)}); a resumed run must keep them (use a "
                          "new MODEL_DIR, or init_from_checkpoint to start a new stage from it)")
      return self.restore(step, abstract_state, shardings)

    newer = set(self.manager.all_steps())
    step, out = _newest_that_restores(self.manager, self.directory, None, restore, log)
    damaged = sorted(s for s in newer if step is not None and s > step)
    if damaged:
      self._move_aside(damaged, log)
    return None if step is None else (step, *out)

  def _move_aside(self, steps, log):
    target = os.path.join(os.path.dirname(self.directory), DAMAGED_SUBDIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for s in steps:
        dest = os.path.join(target, str(s))
        n = 1
        while os.path.exists(dest):
          dest, n = os.path.join(target, f"{s}.{n}"), n + 1
        os.rename(os.path.join(self.directory, str(s)), dest)
        log(f"moved damaged checkpoint step {s} to {dest}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("coder_jax: damaged checkpoints moved")
    self.manager.reload()

  def close(self):
    if self.manager is not None:
      manager, self.manager = self.manager, None
      manager.wait_until_finished()
      manager.close()


def _read_only_manager(model_dir: str):
  directory = os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{model_dir}: no training checkpoint under {CHECKPOINT_SUBDIR}/")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ITEMS), directory


def read_model_config(model_dir: str, step: int | None = None, **runtime):
  """(ModelConfig stored with a training checkpoint, its step): the latest that reads unless
  `step`."""
  mgr, directory = _read_only_manager(model_dir)
  try:
    step, cfg = _newest_that_restores(mgr, directory, step,
                                      lambda s: _stored_config(mgr, s, **runtime), _stderr)
  finally:
    mgr.close()
  if step is None:
    raise FileNotFoundError(f"{model_dir}: no training checkpoint under {CHECKPOINT_SUBDIR}/")
  return cfg, step


def load_params(model_dir: str, step: int | None = None, *, mesh=None, model_cls=DeepseekV2,
                **runtime):
  """(model_cls with the checkpoint's parameters, step): for export and evaluation. Without
  `step`, the newest checkpoint that restores (damaged newer ones are named and skipped)."""
  from flax import nnx
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  from coder_jax.train.state import abstract_model, abstract_params, param_specs, to_shardings
  mesh = mesh or make_mesh(MeshConfig(), jax.devices()[:1])
  mgr, directory = _read_only_manager(model_dir)

  def restore(s):
    cfg = _stored_config(mgr, s, **runtime)
    graphdef, abstract_state = abstract_model(cfg, model_cls)
    params_abs = abstract_params(abstract_state)
    shard = to_shardings(param_specs(abstract_state, mesh), mesh)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          params_abs, shard)
    # Restore only the parameters: a partial target skips the optimizer state.
    restored = mgr.restore(s, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore({"params": target}, restore_args=jax.tree.map(
            lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), {"params": target}),
            partial_restore=True)))["state"]
    return nnx.merge(graphdef, restored["params"])

  try:
    step, model = _newest_that_restores(mgr, directory, step, restore, _stderr)
  finally:
    mgr.close()
  if step is None:
    raise FileNotFoundError(f"{model_dir}: no training checkpoint under {CHECKPOINT_SUBDIR}/")
  return model, step


def file_sha256(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def record_tokenizer(model_dir: str, path: str, *, resumed: bool) -> dict:
  """Copies the run's tokenizer to MODEL_DIR/tokenizer.json (where decode, eval and HF export
  find it) and returns {"path", "sha256"} for the checkpoints. A resumed run must keep the
  tokenizer it was trained with."""
  digest = file_sha256(path)
  dest = os.path.join(model_dir, TOKENIZER_NAME)
  if os.path.exists(dest) and os.path.abspath(dest) != os.path.abspath(path):
    if resumed and file_sha256(dest) != digest:
      raise ValueError(f"tokenizer: {model_dir} was trained with {dest}, but the data now uses "
                       f"{path}, a different tokenizer; resume with the same DATA_DIR/tokenizer "
                       "or use a new MODEL_DIR")
  if jax.process_index() == 0 and os.path.abspath(dest) != os.path.abspath(path):
    with open(path, "rb") as f:
      write_atomic(dest, f.read())
  return {"path": os.path.abspath(path), "sha256": digest}


class PreemptionGuard:
  """Turns a preemption notice (SIGTERM) or a first Ctrl-C (SIGINT) into a stop the training loop
  checks after each step (`requested(step)`), so the run saves a checkpoint and exits; a second
  Ctrl-C interrupts at once.

  One process: Python signal handlers set a flag. Several processes: JAX's coordination service
  carries the notice (as MaxText does): jax.distributed's preemption sync manager catches SIGTERM
  in C++ (so no Python handler may replace it), tells every process, and
  `CheckpointManager.reached_preemption(step)` turns true on all of them at the same step; until
  a notice arrives asking costs nothing, no collective runs per step. Ctrl-C on one process is
  sent on as SIGTERM to itself, so it reaches the others the same way. Where the preemption
  service is off (`jax_enable_preemption_service=False`), the flags are all-gathered every
  `fallback_every` steps instead (a collective then, not every step)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, manager=None, *, fallback_every: int = 10):
    self._flag = threading.Event()
    self.signal_name = None
    self._previous = {}
    self._manager = manager
    self.fallback_every = max(int(fallback_every), 1)
    self.mode = "signal"
    if jax.process_count() > 1:
      try:   # jax keeps the sync manager in a private module; without it, gather
        from jax._src import distributed
        sync = distributed.global_state.preemption_sync_manager
      except (ImportError, AttributeError):
        sync = None
      self.mode = "coordination" if sync is not None else "gather"

  def _handle(self, signum, _frame):
    if signum == signal.SIGINT and self._flag.is_set():
      raise KeyboardInterrupt
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again to abort "
            "without saving)", file=sys.stderr, flush=True)
    self.signal_name = signal.Signals(signum).name
    self._flag.set()
    if self.mode == "coordination":
      os.kill(os.getpid(), signal.SIGTERM)   # to the C++ handler: the notice reaches every host

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        if sig == signal.SIGTERM and self.mode == "coordination":
          continue   # jax's preemption notifier holds SIGTERM
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def requested(self, step: int | None = None) -> bool:
    """Whether to save and stop after `step` (the step just run; every process asks at every
    step with the same numbers)."""
    local = self._flag.is_set()
    if self.mode == "signal":
      return local
    if self.mode == "coordination":
      if step is None:
        raise ValueError("requested: the step is needed across processes")
      stop = self._reached(step)
      if stop and self.signal_name is None:
        self.signal_name = "SIGTERM"
      return stop
    if step is not None and step % self.fallback_every:
      return False
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

  def _reached(self, step: int) -> bool:
    if self._manager is not None:
      return bool(self._manager.reached_preemption(step))
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
