"""Small building blocks: parameters that carry logical axis names, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coder_jax.model.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


def normal_param(rngs: nnx.Rngs, shape, axes: tuple, std: float, dtype) -> nnx.Param:
  """A normally initialised weight whose `axes` metadata names one logical axis per dim."""
  assert len(axes) == len(shape), (shape, axes)
  value = jax.random.normal(rngs.params(), shape, jnp.float32) * std
  return nnx.Param(value.astype(dtype), axes=tuple(axes))


def ones_param(shape, axes: tuple, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype, axis_name: str = "norm"):
    self.eps = eps
    self.weight = ones_param((dim,), (axis_name,), param_dtype)

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # The reference casts back to the input dtype before applying the weight.
    return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def swiglu(x, w_gate, w_up, w_down, dtype):
  """down(silu(x @ gate) * (x @ up)); weights [D, F], [D, F], [F, D]."""
  x = x.astype(dtype)
  g = x @ w_gate.astype(dtype)
  u = x @ w_up.astype(dtype)
  return (jax.nn.silu(g) * u) @ w_down.astype(dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward; the dense layers and the shared experts."""

  def __init__(self, cfg: ModelConfig, intermediate: int, *, rngs: nnx.Rngs):
    pd, std, d = dtype_of(cfg.param_dtype), cfg.initializer_range, cfg.hidden_size
    self.dtype = dtype_of(cfg.dtype)
    self.gate_proj = normal_param(rngs, (d, intermediate), ("embed", "mlp"), std, pd)
    self.up_proj = normal_param(rngs, (d, intermediate), ("embed", "mlp"), std, pd)
    self.down_proj = normal_param(rngs, (intermediate, d), ("mlp", "embed"), std, pd)

  def __call__(self, x):
    return swiglu(x, self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.dtype)
