"""Models with numpy-random parameters for tests (fast: no per-parameter jit of the samplers)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.model.decoder import init_model


def graph_and_params(model):
  """(graphdef, the parameters as a pure dict): what jitted loss functions take."""
  return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))


def random_model_state(cfg, seed):
  """(graphdef, state) of init_model(cfg) with float32 numpy-random parameters: norms near 1,
  router gates wide enough for clear-cut routing, the rest N(0, 0.1^2). (Eager init_model
  compiles every parameter's sampler separately, which takes many seconds on CPU.)"""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg, seed)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    z = rng.normal(size=leaf.shape)
    if "norm" in name:
      v = 1.0 + 0.1 * z
    elif "['gate']" in name:
      v = 0.5 * z
    else:
      v = 0.1 * z
    return jnp.asarray(v, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)
