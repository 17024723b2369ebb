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
import threading

import jax
import orbax.checkpoint as ocp

from coder_jax.model.config import config_from_dict, config_to_dict

CHECKPOINT_SUBDIR = "checkpoints"


class Checkpointer:
  def __init__(self, model_dir: str, *, every: int, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    self.every = every
    opts = ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep,
                                        enable_async_checkpointing=async_save, create=True,
                                        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "data", "model_config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, model_cfg, *, force: bool = False) -> bool:
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

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _read_only_manager(model_dir: str):
  return ocp.CheckpointManager(os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR),
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=("state", "data", "model_config"))


def read_model_config(model_dir: str, step: int | None = None, **runtime):
  """The ModelConfig stored with a training checkpoint (latest step by default)."""
  mgr = _read_only_manager(model_dir)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{model_dir}: no training checkpoint under {CHECKPOINT_SUBDIR}/")
  d = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
  mgr.close()
  return config_from_dict(dict(d), **runtime), step


def load_params(model_dir: str, step: int | None = None, *, mesh=None, **runtime):
  """(model with the checkpoint's parameters, step): for export and evaluation."""
  from flax import nnx
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  from coder_jax.train.state import abstract_model, abstract_params, param_specs, to_shardings
  cfg, step = read_model_config(model_dir, step, **runtime)
  mesh = mesh or make_mesh(MeshConfig(), jax.devices()[:1])
  graphdef, abstract_state = abstract_model(cfg)
  params_abs = abstract_params(abstract_state)
  shard = to_shardings(param_specs(abstract_state, mesh), mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params_abs, shard)
  mgr = _read_only_manager(model_dir)
  # Restore only the parameters: a partial target skips the optimizer state.
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore({"params": target}, restore_args=jax.tree.map(
          lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), {"params": target}),
          partial_restore=True)))["state"]
  mgr.close()
  return nnx.merge(graphdef, restored["params"]), step


class PreemptionGuard:
  """Turns SIGTERM (preemption notice) into a flag the training loop checks after each step;
  across hosts any host's flag counts."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))
