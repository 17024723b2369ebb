"""Context parallelism: the sequence split over the `context` mesh axis, attention gathering
MLA's compressed latent (kv_lora_rank + qk_rope_head_dim values per token) instead of per-head
keys and values.

Layout (causal load balancing): a row of S tokens is cut into 2n chunks of c = S / 2n for a
context axis of n; device d holds chunks d and 2n-1-d (one early, one late), so every device
has the same causal work. `DeepseekV2.hidden_states` reorders the tokens, segment ids and
positions into this layout before the first layer (`to_balanced`; RoPE uses the original
positions) and restores the order of the final hidden states (`from_balanced`), so the loss
and everything outside the decoder see the sequence in its own order.

Attention per layer (`context_attention`, inside `shard_map`): each device all-gathers the
latent + rope key of its rows over `context` ([B, S, 576] for DeepSeek-V2), restores the
original order, expands keys and values for its own heads with kv_b_proj, and attends with its
two query chunks. Chunk j's keys are rolled so that its visible prefix [0, (j+1)c) ends the
array and the query chunk is its last c positions; the wrapped-around future keys get a segment
id no query has. Any `attention_impl` then sees plain "queries are the last T of S keys"
attention (the XLA reference and the Pallas kernels support it), and the kernels skip the
masked blocks by their segment spans. The backward of the gather is a reduce-scatter of the
latent's gradient: only latent-sized tensors cross devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coder_jax.parallel.mesh import context_length_problem
from coder_jax.parallel.rules import context_size, logical_to_spec


def check_length(seq_len: int, n: int) -> None:
  problem = context_length_problem(seq_len, n)
  if problem:
    raise ValueError(f"context parallelism: {problem}")


def to_balanced(x, n: int, axis: int = 1):
  """Reorder the 2n chunks along `axis` to 0, 2n-1, 1, 2n-2, ...: contiguous shards of the
  result put chunks d and 2n-1-d on context device d."""
  if n == 1:
    return x
  x = jnp.moveaxis(x, axis, 0)
  c = x.shape[0] // (2 * n)
  chunks = x.reshape((2 * n, c) + x.shape[1:])
  pairs = jnp.stack([chunks[:n], chunks[n:][::-1]], axis=1)   # [n, 2, c, ...]
  return jnp.moveaxis(pairs.reshape(x.shape), 0, axis)


def from_balanced(x, n: int, axis: int = 1):
  """The inverse of `to_balanced`."""
  if n == 1:
    return x
  x = jnp.moveaxis(x, axis, 0)
  c = x.shape[0] // (2 * n)
  pairs = x.reshape((n, 2, c) + x.shape[1:])
  chunks = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]], axis=0)   # [2n, c, ...]
  return jnp.moveaxis(chunks.reshape(x.shape), 0, axis)


def _spec(axes, shape, mesh):
  """The partition spec of an activation whose length must be split over `context`."""
  spec = logical_to_spec(axes, shape, mesh)
  if "activation_length" in axes:
    i = axes.index("activation_length")
    got = spec[i] if isinstance(spec[i], tuple) else (spec[i],)
    if "context" not in got:
      raise ValueError(f"context parallelism: dimension {i} of shape {shape} cannot be split "
                       f"over the context axis ({mesh.shape['context']})")
  return spec


def context_attention(cfg, q_BTHK, latent_BTR, k_rope_BTK, segment_ids_BT, w_kv_RHK, attend, *,
                      communicate: str = "latent"):
  """Attention output [B, T, H, v_head_dim] of the balanced-layout queries over the whole
  sequence, communicating only the latent + rope key. attend: an `attention_impl`.
  communicate="kv": expand locally and gather per-head keys and values instead (the layout of
  ring attention over expanded K/V; benchmarks/context_comm.py measures it beside the latent)."""
  if communicate not in ("latent", "kv"):
    raise ValueError(f"context_attention: communicate must be 'latent' or 'kv', got "
                     f"{communicate!r}")
  from jax.sharding import get_abstract_mesh
  mesh = get_abstract_mesh()
  n = context_size(mesh)
  b, t = segment_ids_BT.shape
  check_length(t, n)
  c = t // (2 * n)
  r, nope = cfg.kv_lora_rank, cfg.qk_nope_head_dim
  kv = jnp.concatenate([latent_BTR, k_rope_BTK.astype(latent_BTR.dtype)], axis=-1)
  q_spec = _spec(("batch", "activation_length", "heads", None), q_BTHK.shape, mesh)
  kv_spec = _spec(("batch", "activation_length", None), kv.shape, mesh)
  seg_spec = _spec(("batch", "activation_length"), segment_ids_BT.shape, mesh)
  w_spec = logical_to_spec((None, "heads", None), w_kv_RHK.shape, mesh)   # fsdp gathered here
  out_spec = P(*q_spec[:3], None)
  scale = cfg.softmax_scale()

  def expand(kv, w):   # latent + rope key -> this device's heads' keys and values
    kvh = jnp.einsum("bsr,rhk->bshk", kv[..., :r], w)
    k_rope = jnp.broadcast_to(kv[:, :, None, r:], kvh.shape[:3] + (kv.shape[-1] - r,))
    return jnp.concatenate([kvh[..., :nope], k_rope], axis=-1), kvh[..., nope:]

  def gather(a):   # this device's [b, 2c, ...] -> [b, t, ...] in the original order
    return from_balanced(jax.lax.all_gather(a, "context", axis=1, tiled=True), n)

  def body(q, kv, seg, w):
    if communicate == "latent":
      k_all, v_all = expand(gather(kv), w)
    else:
      k_all, v_all = (gather(a) for a in expand(kv, w))
    seg_all = gather(seg)
    d = jax.lax.axis_index("context")
    hidden = jnp.min(seg_all) - 1          # an id no token has
    outs = []
    for slot, j in enumerate((d, 2 * n - 1 - d)):
      shift = t - (j + 1) * c              # chunk j's visible keys [0, (j+1)c) end the array
      k_j, v_j, seg_j = (jnp.roll(a, shift, axis=1) for a in (k_all, v_all, seg_all))
      seg_j = jnp.where(jnp.arange(t)[None, :] < shift, hidden, seg_j)
      outs.append(attend(q[:, slot * c:(slot + 1) * c], k_j, v_j,
                         q_segment_ids_BT=seg_j[:, t - c:], kv_segment_ids_BS=seg_j,
                         scale=scale, causal=True))
    return jnp.concatenate(outs, axis=1)

  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, seg_spec, w_spec),
                       out_specs=out_spec, check_vma=False)(q_BTHK, kv, segment_ids_BT, w_kv_RHK)
