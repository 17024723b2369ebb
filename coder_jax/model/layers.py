"""Small building blocks: parameters that carry logical axis names, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coder_jax.model.config import ModelConfig
from coder_jax.parallel.rules import unsplit_context


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


def token_dot(x, w, contract: int = 1, preferred_element_type=None):
  """x [*tokens, *k] . w [*k, *out] -> [*tokens, *out]: x's last `contract` dims with w's first.

  The token dims are flattened into one first, unless the partitioner still splits the sequence
  over `context` (flattening B x T would gather it). With one row-major token dim XLA:CPU forms
  the weight gradient x^T . dy directly; with [B, T, ...] operands it writes dy transposed (a
  copy plus a re-run of the fusion that makes dy), which made a SwiGLU's forward + backward at
  8 x 256 tokens 1.6x slower. Elsewhere the reshapes are bitcasts."""
  lead = x.shape[:x.ndim - contract]
  if len(lead) < 2 or unsplit_context() > 1:
    return jnp.tensordot(x, w, contract, preferred_element_type=preferred_element_type)
  y = jnp.tensordot(x.reshape((-1,) + x.shape[len(lead):]), w, contract,
                    preferred_element_type=preferred_element_type)
  return y.reshape(lead + y.shape[1:])


def swiglu(x, w_gate, w_up, w_down, dtype):
  """down(silu(x @ gate) * (x @ up)); weights [D, F], [D, F], [F, D]."""
  x = x.astype(dtype)
  g = token_dot(x, w_gate.astype(dtype))
  u = token_dot(x, w_up.astype(dtype))
  return token_dot(jax.nn.silu(g) * u, w_down.astype(dtype))


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
