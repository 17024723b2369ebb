"""Train state: float32 parameters (a pure dict of the model's nnx state), optimizer state, step,
RNG and the non-finite-step count, each placed by the logical-axis rules on the mesh.

The state is a plain pytree so Orbax saves and restores it (onto any mesh) without nnx objects.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.model.config import ModelConfig
from coder_jax.model.decoder import DeepseekV2, abstract_model  # noqa: F401  (state.abstract_model)
from coder_jax.parallel.rules import logical_to_spec


def _nested(items):
  out: dict = {}
  for path, value in items:
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = value
  return out


def param_specs(abstract_state, mesh) -> dict:
  """Pure dict of PartitionSpecs, one per parameter, from its `axes` metadata."""
  items = []
  for path, var in nnx.to_flat_state(abstract_state):
    shape = var.get_value().shape
    axes = var.get_metadata().get("axes") or (None,) * len(shape)
    items.append((path, logical_to_spec(axes, shape, mesh)))
  return _nested(items)


def abstract_params(abstract_state) -> dict:
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                      nnx.to_pure_dict(abstract_state))


def opt_state_specs(optimizer, abstract_opt_state, specs: dict):
  """Optimizer leaves that are copies of the parameter tree (Adam's moments) take the
  parameters' specs, placed by optax's own map of its state; the rest (counts) are replicated."""
  return optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_opt_state, specs,
                               transform_non_params=lambda _: P(),
                               is_leaf=lambda x: isinstance(x, P))


def state_specs(cfg: ModelConfig, optimizer, mesh, model_cls=DeepseekV2):
  """(graphdef, abstract train state, PartitionSpec tree of the same structure)."""
  graphdef, abstract_state = abstract_model(cfg, model_cls)
  params = abstract_params(abstract_state)
  pspecs = param_specs(abstract_state, mesh)
  opt_abstract = jax.eval_shape(optimizer.init, params)
  abstract = {"params": params, "opt_state": opt_abstract,
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
              "nonfinite": jax.ShapeDtypeStruct((), jnp.int32)}
  specs = {"params": pspecs, "opt_state": opt_state_specs(optimizer, opt_abstract, pspecs),
           "step": P(), "rng": P(), "nonfinite": P()}
  return graphdef, abstract, specs


def to_shardings(specs, mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def init_state(cfg: ModelConfig, optimizer, mesh, *, seed: int = 0, params: dict | None = None,
               model_cls=DeepseekV2):
  """A fresh sharded train state (parameters from `params`, e.g. a Hugging Face checkpoint, or
  initialised from `seed` directly on their devices)."""
  graphdef, abstract, specs = state_specs(cfg, optimizer, mesh, model_cls)
  shardings = to_shardings(specs, mesh)

  def build(p):
    if p is None:
      p = nnx.to_pure_dict(nnx.state(model_cls(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param))
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
            "nonfinite": jnp.zeros((), jnp.int32)}

  state = jax.jit(build, out_shardings=shardings)(params)
  return graphdef, state, shardings


def bytes_per_device(abstract, specs, mesh_shape: dict) -> int:
  """Largest per-device footprint of the tree's shards (every device holds one shard per leaf)."""
  total = 0
  leaves = jax.tree.leaves(abstract)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for leaf, spec in zip(leaves, spec_leaves):
    shape = list(leaf.shape)
    for i, ax in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
      names = (ax,) if isinstance(ax, str) else tuple(ax or ())
      div = math.prod(mesh_shape[n] for n in names)
      shape[i] = -(-shape[i] // div)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total
