"""Third-party baselines for the kernels: tokamax (optional) and cuDNN through jax.nn.

Only benchmarks and tests use these; coder_jax.model never imports this module, and tokamax is
imported lazily so that it never becomes a dependency of the model.

Semantics match `pallas_kernels.mla_attention` / `pallas_kernels.grouped_matmul`:
  attention: q, k [B,T,H,Dqk], v [B,T,H,Dv] -> [B,T,H,Dv]; segment_ids [B,T] int32 (tokens attend
    only within equal ids); sm_scale None = Dqk**-0.5.
  grouped matmul: lhs [M,K] sorted by group, rhs [G,K,N], group_sizes [G] int32 summing to <= M
    -> [M,N], rows past sum(group_sizes) are zero.

tokamax API (the same in 0.0.12 and 0.0.17 for what is used here):
  tokamax.dot_product_attention(query, key, value, bias=None, mask=None, *, scale, is_causal,
    query_seq_lengths, key_value_seq_lengths, local_window_size, logits_soft_cap, precision,
    implementation, q_sharding); implementation in "mosaic" | "triton" | "cudnn" | "xla" |
    "xla_chunked" (or a sequence, first that does not raise NotImplementedError). It has no segment
    ids argument (q_sharding is only a sharding): a boolean `mask` [B, 1, T, S] carries them.
  tokamax.ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type, group_offset,
    activation, *, implementation); implementation in "mosaic" | "triton" | "xla" (0.0.17 adds
    "mosaic_tpu_v2" and the keywords bypass_device_check, zero_initialize, fuse_gateup_activation).
  tokamax 0.0.17 imports `xprof.cli.tools.get_kernel_stats_tool` at the top level; where xprof
  is absent a stub module xprof/cli/tools.py defining that name on PYTHONPATH is enough.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class BaselineUnavailableError(ImportError):
  """An optional baseline package is missing (or fails to import)."""


def _import_tokamax():
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    if e.name == "tokamax":
      msg = ("tokamax is not installed; it is an optional baseline only "
             "(pip install tokamax; coder_jax itself does not need it)")
    else:
      # Installed but one of its imports failed, e.g. 0.0.17 without xprof.
      msg = (f"tokamax is installed but failed to import ({e}); tokamax 0.0.17 needs "
             "xprof.cli.tools.get_kernel_stats_tool (a stub module on PYTHONPATH is enough)")
    raise BaselineUnavailableError(msg, name="tokamax") from e
  from absl import flags  # pylint: disable=import-outside-toplevel  (a tokamax dependency)
  if not flags.FLAGS.is_parsed():
    # tokamax 0.0.12 parses absl flags from the whole sys.argv on first use and fails on any
    # other program's arguments (pytest's, a benchmark's). Its flags keep their defaults
    # (--tokamax_* on the command line is not read; tokamax.config's context managers still work).
    flags.FLAGS.mark_as_parsed()
  return tokamax


def tokamax_available() -> bool:
  try:
    _import_tokamax()
  except ImportError:
    return False
  return True


def tokamax_version() -> str | None:
  return _import_tokamax().__version__ if tokamax_available() else None


# Implementations worth timing per platform, best first. tokamax registers every kernel module
# that imports (the GPU and TPU ones import fine on CPU), so the platform has to choose.
_PLATFORM_IMPLS = {
    "gpu": ("mosaic", "triton", "xla"),
    "tpu": ("mosaic", "mosaic_tpu_v2", "xla"),
    "cpu": ("xla",),
}


def tokamax_implementations(op: str, platform: str | None = None) -> tuple[str, ...]:
  """Names of tokamax's implementations of `op` ("attention" | "ragged_dot") on `platform`."""
  _import_tokamax()
  import importlib  # pylint: disable=import-outside-toplevel
  mod = importlib.import_module(f"tokamax._src.ops.{op}.api")
  registered = set(getattr(mod, "IMPLEMENTATIONS", ()))
  platform = platform or jax.default_backend()
  names = []
  for name in _PLATFORM_IMPLS.get(platform, ("xla",)):
    key = f"mosaic_{platform}" if name == "mosaic" else name
    # The registry is private; without it, trust the platform list.
    if not registered or key in registered:
      names.append(name)
  return tuple(names)


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query t may see key s when their segment ids are equal."""
  s = segment_ids_BT
  return (s[:, :, None] == s[:, None, :])[:, None]


def _scale(q, sm_scale):
  return q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)


def tokamax_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None,
                      implementation=None):
  """tokamax.dot_product_attention with mla_attention's arguments (Dv may differ from Dqk)."""
  tk = _import_tokamax()
  mask = None if segment_ids is None else segment_mask(segment_ids)
  return tk.dot_product_attention(q, k, v, mask=mask, scale=_scale(q, sm_scale),
                                  is_causal=causal, implementation=implementation)


def tokamax_grouped_matmul(lhs, rhs, group_sizes, *, implementation=None,
                           preferred_element_type=None, zero_unused_rows=True):
  """tokamax.ragged_dot with grouped_matmul's arguments.

  zero_unused_rows: zero the rows past sum(group_sizes) as grouped_matmul does; tokamax's GPU
  kernels do not promise to write them. Benchmarks whose sizes sum to M turn it off so the
  extra [M, N] select is not timed.
  """
  tk = _import_tokamax()
  out = tk.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                      preferred_element_type=preferred_element_type,
                      implementation=implementation)
  if zero_unused_rows:
    rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)[:, None]
    out = jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))
  return out


def _pad_last(x, d):
  return x if x.shape[-1] == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def cudnn_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None,
                    implementation="cudnn"):
  """jax.nn.dot_product_attention(implementation="cudnn") with mla_attention's arguments.

  jax.nn wants value's head dim equal to key's, so the narrower of (q, k) and v is zero-padded
  to the wider and the output sliced back to Dv; zero columns change neither the scores nor the
  kept output columns, and the padding is part of this baseline's cost. `implementation` passes
  through so the pad/slice is testable with "xla" where cuDNN is absent.

  Segment ids: jax.nn's cuDNN path has no segment ids (its packed q_offsets/kv_offsets layout is
  not exposed); a boolean mask would become a dense [B, N, T, S] additive bias, which is not the
  flash kernel this baseline stands for, so it raises. With "xla" they go in as a mask.
  """
  if segment_ids is not None and implementation == "cudnn":
    raise NotImplementedError(
        "cudnn_attention: jax.nn.dot_product_attention's cuDNN path has no segment ids "
        "(only per-batch query/key_value_seq_lengths); use mla_attention or tokamax")
  dv = v.shape[-1]
  d = max(q.shape[-1], dv)
  mask = None if segment_ids is None else segment_mask(segment_ids)
  out = jax.nn.dot_product_attention(
      _pad_last(q, d), _pad_last(k, d), _pad_last(v, d), mask=mask, scale=_scale(q, sm_scale),
      is_causal=causal, implementation=implementation)
  return out[..., :dv]
