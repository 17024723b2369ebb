"""Decoder: embedding, runs of identical layers under one `lax.scan` each, final norm, LM head.

Layers of one kind (dense or MoE) that follow each other form a run; a run's weights are stacked
on a leading `layers` axis and its body is traced once, so compile time does not grow with depth.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from coder_jax.model.attention import MLAttention
from coder_jax.model.config import ModelConfig
from coder_jax.model.layers import MLP, RMSNorm, dtype_of, normal_param, token_dot
from coder_jax.model.moe import MoE
from coder_jax.model.rope import rope_tables
from coder_jax.model import context
from coder_jax.parallel.rules import constrain, unsplit_context

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    pd = dtype_of(cfg.param_dtype)
    self.kind = kind
    self.routing_devices = cfg.routing_devices
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.self_attn = MLAttention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if kind == "moe":
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x, cos, sin, segment_ids, return_cache: bool = False, prefix=None):
    a = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, return_cache=return_cache,
                       prefix=prefix)
    if return_cache:
      a, cache = a
    x = x + a
    h = self.post_attention_layernorm(x)
    if self.kind == "moe":
      y, routing = self.mlp(h, segment_ids)
      out, aux = x + y, router_stats(routing, segment_ids, self.routing_devices)
    else:
      out, aux = x + self.mlp(h), None
    out = constrain(out, ("batch", "activation_length", "activation_embed"))
    return (out, (aux, cache)) if return_cache else (out, aux)

  def decode(self, x_B1D, cos, sin, cache_latent, cache_rope, positions_B, attend):
    """One token per row through this layer with the latent cache (see MLAttention.decode)."""
    a, caches = self.self_attn.decode(self.input_layernorm(x_B1D), cos, sin, cache_latent,
                                      cache_rope, positions_B, attend)
    x = x_B1D + a
    h = self.post_attention_layernorm(x)
    y = self.mlp(h)[0] if self.kind == "moe" else self.mlp(h)
    return constrain(x + y, ("batch", "activation_length", "activation_embed")), caches


def router_stats(r, segment_ids_BT, num_devices: int = 1):
  """Per-sequence sums the balance losses are built from (padding, segment id 0, excluded).

  score_sum[b, e] = sum_t s_{t,e}; count[b, e] = #tokens t routed to e; tokens[b] = #valid t;
  device_count[b, i] = #tokens t with at least one expert in device group i (of num_devices
  contiguous groups); dropped[b] = #copies of valid tokens dropped at capacity.
  """
  b, t = segment_ids_BT.shape
  valid = (segment_ids_BT > 0).astype(jnp.float32)
  e = r.scores_NE.shape[-1]
  scores = r.scores_NE.reshape(b, t, e)
  chosen = jax.nn.one_hot(r.experts_NK.reshape(b, t, -1), e, dtype=jnp.float32).sum(axis=2)
  on_device = chosen.reshape(b, t, num_devices, e // num_devices).max(axis=-1)
  kept = (jnp.ones(r.experts_NK.shape, jnp.float32) if r.kept_NK is None
          else r.kept_NK.astype(jnp.float32))
  dropped = jnp.einsum("btk,bt->b", 1.0 - kept.reshape(b, t, -1), valid)
  return dict(score_sum=jnp.einsum("bte,bt->be", scores, valid),
              count=jnp.einsum("bte,bt->be", chosen, valid),
              device_count=jnp.einsum("bti,bt->bi", on_device, valid),
              tokens=valid.sum(axis=1), dropped=dropped)


class LayerStack(nnx.Module):
  """`n` layers of one kind with stacked weights (leading axis = layer)."""

  def __init__(self, cfg: ModelConfig, kind: str, n: int, *, rngs: nnx.Rngs):
    self.cfg, self.kind, self.n = cfg, kind, n
    keys = jax.random.split(rngs.params(), n)

    def one(key):
      return nnx.state(DecoderLayer(cfg, kind, rngs=nnx.Rngs(params=key)))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(cfg, kind, rngs=nnx.Rngs(0))))
    self.layers = nnx.merge(graphdef, jax.vmap(one)(keys))
    for _, var in nnx.iter_graph(self.layers):
      if isinstance(var, nnx.Variable) and var.has_metadata("axes"):
        var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))

  def __call__(self, x, cos, sin, segment_ids, return_cache: bool = False, prefix=None):
    """prefix: (latent [L, P, S, R], rope key [L, P, S, K], segment ids [P, S], g): per layer
    the cache entries of a prefix shared by runs of g rows (MLAttention's prefix)."""
    graphdef, state = nnx.split(self.layers)

    def body(h, xs):
      layer_state, entries = xs
      p = None if entries is None else (*entries, prefix[2], prefix[3])
      return nnx.merge(graphdef, layer_state)(h, cos, sin, segment_ids, return_cache, p)

    policy = self.cfg.remat_policy
    if policy != "none":
      body = jax.checkpoint(body, policy=_REMAT[policy], prevent_cse=not self.scans())
    return self._layers(body, x, (state, None if prefix is None else prefix[:2]))

  def scans(self) -> bool:
    """Whether the layers run as a `lax.scan`: cfg.scan_layers, or when that is None a scan
    except on a CPU target. XLA:CPU materialises the scan's plumbing as copies: each layer's
    slice of the stacked weights, and for the backward each layer's residuals stacked then
    sliced out again (about 8% of a forward + backward of benchmarks/peer_cpu.py's model).
    Accelerators keep the scan (one layer's code, compile time flat in depth)."""
    if self.cfg.scan_layers is not None:
      return bool(self.cfg.scan_layers)
    from pallas_kernels.backends import target_platform
    return target_platform() != "cpu"

  def _layers(self, body, x, xs):
    """scan(body, x, xs) over the layers: a `lax.scan` when `scans()`, else unrolled."""
    if self.scans():
      return jax.lax.scan(body, x, xs)
    ys = []
    for i in range(self.n):
      x, y = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
      ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None

  def unstacked(self) -> list:
    """The run's layers as separate modules, each holding its own copy of its weights."""
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(self.n)]

  def decode(self, x_B1D, cos, sin, caches, positions_B, attend, layers=None):
    """One token per row through the run. caches: per layer (latent [B, S, R], rope [B, S, K]);
    returns (x, the caches with the token's entries written). The layers are unrolled: a scan
    inside the sampling loop would copy every layer's weights out of the stack for each token
    (the decode step is small, so compile time grows little with depth). layers: the run's
    layers from `unstacked()` (default: sliced from the stack here)."""
    out = []
    for layer, (latent, rope) in zip(self.unstacked() if layers is None else layers, caches):
      x_B1D, c = layer.decode(x_B1D, cos, sin, latent, rope, positions_B, attend)
      out.append(c)
    return x_B1D, out


def segment_positions(segment_ids_BT):
  """Positions that restart at 0 wherever the segment id changes along the row."""
  t = segment_ids_BT.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids_BT.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def token_layout(input_ids_BT, segment_ids_BT=None, positions_BT=None):
  """(input ids, segment ids, positions) as [B, T] arrays: segment ids default to one document
  per row, positions to restarting at each segment; a shape that differs is a clear error."""
  input_ids_BT = jnp.asarray(input_ids_BT)
  if input_ids_BT.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids_BT.shape}")
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
  if positions_BT is None:
    positions_BT = segment_positions(segment_ids_BT)
  for name, a in (("segment_ids", segment_ids_BT), ("positions", positions_BT)):
    if jnp.shape(a) != input_ids_BT.shape:
      raise ValueError(f"{name} must have the shape of input_ids {input_ids_BT.shape}, "
                       f"got {jnp.shape(a)}")
  return input_ids_BT, jnp.asarray(segment_ids_BT), jnp.asarray(positions_BT)


class DeepseekV2(nnx.Module):
  """The causal LM: `model(input_ids)` -> logits [B, T, vocab] (float32).

  Packed rows: pass `segment_ids` (>0 per document, 0 for padding; attention never crosses a
  change of id) and optionally `positions` (default: restart at 0 at each segment start).
  `return_aux=True` also returns {'router': [per MoE run: dict of [layers, B, E] stats]}.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std = dtype_of(cfg.param_dtype), cfg.initializer_range
    self.embed_tokens = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                     std, pd)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(cfg.layer_kinds())]
    self.runs = tuple(runs)
    self.stacks = nnx.List([LayerStack(cfg, k, n, rngs=rngs) for k, n in runs])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if not cfg.tie_word_embeddings:
      self.lm_head = normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  std, pd)

  def hidden_states(self, input_ids_BT, segment_ids_BT=None, positions_BT=None,
                    return_cache: bool = False, prefix=None):
    """Final-normed hidden states [B, T, D] and the aux dict (with return_cache, aux["cache"]
    holds per run of layers the cache entries: latent [L, B, T, R], rope key [L, B, T, K]).

    prefix: tokens before these that runs of g rows share, already run through the model:
    (its return_cache aux["cache"], its segment ids [B / g, S], g). Each row then attends to
    its run's prefix as well, so its hidden states are those of the row prefix + its tokens
    (give positions that continue the prefix's); the prefix runs once for g rows."""
    cfg = self.cfg
    input_ids_BT, segment_ids_BT, positions_BT = token_layout(input_ids_BT, segment_ids_BT,
                                                              positions_BT)
    n = unsplit_context()
    if n > 1:   # context parallelism: tokens in the load-balanced order (model/context.py)
      if prefix is not None:
        raise ValueError(f"a shared prefix needs a mesh whose context axis is 1; this mesh "
                         f"has context={n}")
      if return_cache:
        raise ValueError(f"the latent cache (prefill for decoding) needs a mesh whose context "
                         f"axis is 1; this mesh has context={n}")
      context.check_length(input_ids_BT.shape[1], n)
      input_ids_BT, segment_ids_BT, positions_BT = (
          context.to_balanced(a, n) for a in (input_ids_BT, segment_ids_BT, positions_BT))
    x = constrain(self.embed(input_ids_BT), ("batch", "activation_length", "activation_embed"))
    cos, sin = rope_tables(cfg, positions_BT)
    router, cache = [], []
    for r, stack in enumerate(self.stacks):
      p = None if prefix is None else (*prefix[0][r], *prefix[1:])
      x, aux = stack(x, cos, sin, segment_ids_BT, return_cache, p)
      if return_cache:
        aux, entries = aux
        cache.append(entries)
      if aux is not None:
        router.append(aux)
    out = {"router": router}
    if return_cache:
      out["cache"] = cache
    if n > 1:
      x = constrain(context.from_balanced(x, n),
                    ("batch", "activation_length", "activation_embed"))
    return self.norm(x), out

  def embed(self, input_ids):
    return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype_of(self.cfg.dtype))

  def head_weight(self):
    """The vocabulary projection [D, vocab]: lm_head, or the embedding's transpose when tied."""
    return self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def logits(self, h_BTD):
    dt = dtype_of(self.cfg.dtype)
    return token_dot(h_BTD.astype(dt), self.head_weight().astype(dt),
                     preferred_element_type=jnp.float32)

  def __call__(self, input_ids_BT, segment_ids_BT=None, positions_BT=None, return_aux=False):
    h, aux = self.hidden_states(input_ids_BT, segment_ids_BT, positions_BT)
    logits = self.logits(h)
    return (logits, aux) if return_aux else logits


def init_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV2:
  return DeepseekV2(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig, model_cls=DeepseekV2):
  """(graphdef, nnx state of shapes and dtypes) of model_cls(cfg, rngs=...) (the causal LM, or
  e.g. the reward model), without allocating a weight."""
  return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
