"""The device mesh: axes data, fsdp, context, expert, tensor (sizes from gin; one may be -1).

Every divisibility a run needs is checked here, before anything is traced or compiled, and
reported as a `MeshError` that names the numbers to change.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from coder_jax.parallel.rules import MESH_AXES


class MeshError(ValueError):
  """The mesh does not fit the devices, the model or the batch."""


@gin.configurable("mesh_config")
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1
  context: int = 1     # splits the sequence (context parallelism, model/context.py)

  def sizes(self, num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 axis filled so that their product is num_devices."""
    raw = {a: getattr(self, a) for a in MESH_AXES}
    free = [a for a, n in raw.items() if n == -1]
    bad = [f"{a}={n}" for a, n in raw.items() if n != -1 and (not isinstance(n, int) or n < 1)]
    if bad:
      raise MeshError(f"mesh_config: axis sizes must be positive integers or -1, got {', '.join(bad)}")
    if len(free) > 1:
      raise MeshError(f"mesh_config: at most one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(n for n in raw.values() if n != -1)
    if free:
      if num_devices % fixed:
        raise MeshError(f"mesh_config: {num_devices} devices are not divisible by the fixed axes "
                        f"({_fmt(raw)}; product {fixed})")
      raw[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise MeshError(f"mesh_config: axes {_fmt(raw)} multiply to {fixed}, "
                      f"but there are {num_devices} devices")
    return raw


def _fmt(sizes) -> str:
  return " ".join(f"{a}={n}" for a, n in sizes.items())


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A mesh over `devices` (default: all). Devices are laid out with the last axis (tensor)
  fastest, so tensor- and expert-parallel groups are neighbours (one host / one NVLink island)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.sizes(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU / unusual topologies: plain order
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(cfg: MeshConfig, num_devices: int) -> AbstractMesh:
  """A mesh of `num_devices` that need not exist (for --dry_run of a pod-sized run)."""
  sizes = cfg.sizes(num_devices)
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_shards(mesh) -> int:
  """Devices the batch is split over (data x fsdp x expert)."""
  return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]


def context_length_problem(seq_len: int, n: int) -> str | None:
  """Why a sequence of seq_len tokens cannot be split over a context axis of n, or None."""
  if seq_len % (2 * n):
    return (f"seq_len={seq_len} is not divisible by 2 x the context axis ({n}) = {2 * n} (each "
            "device holds one early and one late chunk of every sequence)")
  return None


def check_fit(mesh, model_cfg, *, batch_size: int | None = None, grad_accum_steps: int = 1,
              seq_len: int | None = None):
  """Raise MeshError when the model or the batch does not divide over the mesh."""
  s = dict(mesh.shape)
  s.setdefault("context", 1)
  problems = []
  # Only a split sequence is reordered into 2 x context chunks (model/context.py); with context
  # 1 any length runs (a GRPO row, prompt slot + new tokens - 1, is often odd).
  if seq_len is not None and s["context"] > 1 and (
      split := context_length_problem(seq_len, s["context"])):
    problems.append(split)
  if model_cfg.has_moe and model_cfg.n_routed_experts % s["expert"]:
    problems.append(f"n_routed_experts={model_cfg.n_routed_experts} is not divisible by the "
                    f"expert axis ({s['expert']})")
  if not model_cfg.has_moe and s["expert"] > 1:
    problems.append(f"the model has no routed experts but the expert axis is {s['expert']}")
  if model_cfg.num_attention_heads % s["tensor"]:
    problems.append(f"num_attention_heads={model_cfg.num_attention_heads} is not divisible by "
                    f"the tensor axis ({s['tensor']})")
  if (model_cfg.has_moe and model_cfg.routing_device_limit is not None
      and model_cfg.routing_devices % s["expert"]):
    problems.append(f"routing_devices={model_cfg.routing_devices} must be a multiple of the "
                    f"expert axis ({s['expert']}) for device-limited routing to bound devices")
  if batch_size is not None:
    if grad_accum_steps < 1 or batch_size % grad_accum_steps:
      problems.append(f"batch_size={batch_size} is not divisible by "
                      f"grad_accum_steps={grad_accum_steps}")
    else:
      micro = batch_size // grad_accum_steps
      n = batch_shards(mesh)
      if micro % n:
        problems.append(f"batch_size={batch_size} (micro-batch {micro} with grad_accum_steps="
                        f"{grad_accum_steps}) is not divisible by data x fsdp x expert = "
                        f"{s['data']} x {s['fsdp']} x {s['expert']} = {n}")
  if problems:
    raise MeshError("mesh " + _fmt(dict(s)) + ": " + "; ".join(problems))
