"""The Pallas kernels (and tokamax, where installed) as `attention_impl` / `moe_impl` choices.

  reference       plain XLA (attention: masked softmax; experts: lax.ragged_dot)
  pallas          our kernel for this platform: Triton on GPU, Mosaic on TPU; on CPU the
                  Triton kernel in Pallas' interpreter (slow; for tests)
  pallas_triton   the GPU kernel; interpreted unless running on a GPU
  pallas_tpu      the TPU kernel; interpreted with TPU semantics unless running on a TPU
  tokamax         tokamax's kernels (optional package; a baseline)
  auto            the fastest correct choice for the platform: pallas on GPU and TPU; on CPU
                  the XLA attention and the tiled expert scan (XLA:CPU lowers ragged_dot densely)

`auto` resolves when the model is traced, for the platform it is compiled for (the devices of
the mesh in context, e.g. a TPU topology compiled for on a CPU machine), so a config saved on one
platform runs on another.
"""

from __future__ import annotations

import functools

from pallas_kernels.backends import target_platform

from coder_jax.model.attention import get_attention_impl, register_attention_impl
from coder_jax.model.moe import get_moe_impl, register_moe_impl, sorted_experts
from coder_jax.parallel.rules import per_shard, unsplit_context

# Attention kernels run per (batch rows, heads) shard under a mesh.
_QKV = ("batch", "activation_length", "heads", None)
_SEG = ("batch", "activation_length")

_NATIVE = {"triton": "gpu", "tpu": "tpu"}


def kernel_backend(backend: str | None) -> tuple[str, bool]:
  """(pallas backend, interpret) for a requested backend (None: the target's), from the platform
  the program is compiled for (pallas_kernels.backends.target_platform), not the host."""
  platform = target_platform()
  if backend is None:
    backend = "tpu" if platform == "tpu" else "triton"
  return backend, platform != _NATIVE[backend]


def _self_attention(name: str, attend, short_queries: bool = True):
  """An attention impl running `attend(q, k, v, *, segment_ids, causal, sm_scale)` on each
  device's rows and heads. short_queries: `attend` takes k, v longer than q (the queries are
  the keys' last T positions; segment_ids are the keys'), as model/context.py calls it."""
  def impl(q_BTHK, k_BSHK, v_BSHV, *, q_segment_ids_BT, kv_segment_ids_BS, scale, causal=True):
    t, s = q_BTHK.shape[1], k_BSHK.shape[1]
    if t == s and kv_segment_ids_BS is not q_segment_ids_BT:
      raise NotImplementedError(f"attention_impl {name}: self-attention only (one segment_ids "
                                "for queries and keys); decoding has its own kernel")
    if t != s and not short_queries:
      raise NotImplementedError(f"attention_impl {name}: queries shorter than keys (context "
                                "parallelism) are not supported; use pallas or reference")
    if unsplit_context() > 1:
      # Run per shard over a split length, a kernel would attend only within its own chunk.
      raise ValueError(f"attention_impl {name}: the sequence is split over the context axis "
                       f"({unsplit_context()}); attention must go through "
                       "model/context.py's context_attention (MLAttention does)")

    def run(q, k, v, seg):
      return attend(q, k, v, segment_ids=seg, causal=causal, sm_scale=scale)
    return per_shard(run, (q_BTHK, k_BSHK, v_BSHV, kv_segment_ids_BS), (_QKV, _QKV, _QKV, _SEG),
                     _QKV, v_BSHV.shape)
  return impl


def _pallas_attention(q, k, v, *, backend=None, **kw):
  from pallas_kernels import mla_attention
  backend, interpret = kernel_backend(backend)
  return mla_attention(q, k, v, backend=backend, interpret=interpret, **kw)


def _tokamax_attention(q, k, v, **kw):
  from pallas_kernels.baselines import tokamax_attention
  return tokamax_attention(q, k, v, **kw)


def _auto_attention(*args, **kw):
  impl = "reference" if target_platform() == "cpu" else "pallas"
  return get_attention_impl(impl)(*args, **kw)


def _pallas_matmul(lhs, rhs, group_sizes, *, backend=None):
  from pallas_kernels import grouped_matmul
  backend, interpret = kernel_backend(backend)
  return grouped_matmul(lhs, rhs, group_sizes, backend=backend, interpret=interpret)


def _tokamax_matmul(lhs, rhs, group_sizes):
  from pallas_kernels.baselines import tokamax_grouped_matmul
  return tokamax_grouped_matmul(lhs, rhs, group_sizes)


def _auto_experts(*args, **kw):
  impl = "tiled" if target_platform() == "cpu" else "pallas"
  return get_moe_impl(impl)(*args, **kw)


for _name, _backend in (("pallas", None), ("pallas_triton", "triton"), ("pallas_tpu", "tpu")):
  register_attention_impl(_name, _self_attention(
      _name, functools.partial(_pallas_attention, backend=_backend)))
  register_moe_impl(_name, functools.partial(
      sorted_experts, matmul=functools.partial(_pallas_matmul, backend=_backend)))
register_attention_impl("tokamax", _self_attention("tokamax", _tokamax_attention,
                                                   short_queries=False))
register_moe_impl("tokamax", functools.partial(sorted_experts, matmul=_tokamax_matmul))
register_attention_impl("auto", _auto_attention)
register_moe_impl("auto", _auto_experts)
