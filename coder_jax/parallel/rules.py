"""The one table that maps logical axis names (used by the model code) to mesh axes.

Model parameters carry `axes` metadata (one logical name per dimension); nothing else in the
library names mesh axes. A mesh axis that the mesh lacks, or that does not divide the dimension,
is dropped for that parameter (replication), so one table serves every mesh shape.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# context sits inside fsdp and outside expert: its per-layer all-gather of the latent is smaller
# than the MoE all_to_all, which keeps the nearest neighbours (with tensor).
MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    # Context parallelism: activations are split along the sequence (attention gathers the
    # compressed latent over `context`, model/context.py).
    ("activation_length", "context"),
    ("activation_embed", None),
    ("layers", None),
    ("vocab", "tensor"),
    # FSDP shards weights over fsdp x expert: the expert axis holds distinct tokens like fsdp,
    # and expert weights (whose `experts` dim already took `expert`) fall back to fsdp alone.
    ("embed", ("fsdp", "expert")),
    ("norm", None),
    ("heads", "tensor"),
    ("qk_head", None),
    ("v_head", None),
    ("kv_head", None),
    ("q_lora", ("fsdp", "expert")),    # q_b / kv_b have no embed dim to shard
    ("kv_lora", ("fsdp", "expert")),
    ("mlp", "tensor"),
    ("router", None),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    size = 1
    for t in targets:
      if t in used or (mesh is not None and t not in mesh.shape):
        continue
      n = mesh.shape[t] if mesh is not None else 1
      if shape is not None and shape[i] % (size * n):
        continue
      keep.append(t)
      size *= n
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes, shape) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def context_size(mesh=None) -> int:
  """Devices the sequence is split over under `mesh` (default: the current one); 1 without."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return 1
  return dict(mesh.shape).get("context", 1)


def unsplit_context() -> int:
  """The context axis size while the sequence is still split over it by the partitioner
  (outside `shard_map`); 1 inside `shard_map`, where arrays are one device's."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.are_all_axes_manual:
    return 1
  return context_size(mesh)


def constrain(x, axes):
  """Pin an activation's sharding by logical axis names under the current mesh (no-op without
  one), so XLA does not pick a layout that gathers the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def per_shard(fn, args, in_axes, out_axes, out_shape):
  """fn(*args) run on each device's shard inside `shard_map` when a mesh is active.

  Kernels (pallas_call) are opaque to XLA's partitioner, which would gather their operands and
  compute the whole batch on every device; here each device runs the kernel on its own rows
  (and heads). in_axes / out_axes: logical axis names per dimension, as for parameters.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
    return fn(*args)  # no mesh, or already inside a shard_map: the arrays are this device's
  in_specs = tuple(logical_to_spec(ax, a.shape, mesh) for ax, a in zip(in_axes, args))
  out_spec = logical_to_spec(out_axes, out_shape, mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*args)
