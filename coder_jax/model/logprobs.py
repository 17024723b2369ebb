"""Per-token log-probabilities of given targets without the whole [B, T, vocab] logits.

With a 102400-token vocabulary the logits of a GRPO batch dwarf everything else the forward
keeps (8 rows x 4096 tokens is 13 GB in float32), yet the loss needs one number per token. So
the sequence is cut into chunks of positions and a scan computes, chunk by chunk, the logits,
their log-softmax at the targets (and the entropy); each chunk is rematerialised in the backward
pass, so neither direction holds more than one chunk [B, chunk, vocab] of logits at a time.

cross_entropy_from_hidden is the training loss (a weighted sum of token cross-entropies) in the
same chunks, with its gradients formed in the forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from coder_jax.model.decoder import token_layout
from coder_jax.model.layers import token_dot
from coder_jax.parallel.rules import constrain, unsplit_context


def _chunk_stats(model, h_BCD, targets_BC, temperature, with_entropy: bool):
  logits = model.logits(h_BCD) / temperature
  logits = constrain(logits, ("batch", "activation_length", "vocab"))
  logz_BC = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0]
  logp_BC = picked - logz_BC
  if not with_entropy:
    return logp_BC, jnp.zeros_like(logp_BC)
  p = jnp.exp(logits - logz_BC[..., None])
  return logp_BC, logz_BC - jnp.sum(p * logits, axis=-1)     # H = log Z - E_p[logit]


def _position_chunks(arrays_BT, chunk_size: int):
  """[B, T, ...] arrays as [n, B, c, ...]: n balanced chunks of c positions (every row at
  once; zero padding at the end stays under n positions), and (n, c)."""
  t = arrays_BT[0].shape[1]
  n = -(-t // chunk_size)
  c = -(-t // n)
  out = []
  for a in arrays_BT:
    a = jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
    out.append(a.reshape((a.shape[0], n, c) + a.shape[2:]).swapaxes(0, 1))
  return tuple(out), (n, c)


def cross_entropy_from_hidden(model, h_BTD, targets_BT, weights_BT, *,
                              chunk_size: int | None = None):
  """sum over positions of weights * -log softmax(logits)[target], float32, from the final
  hidden states: the training loss of model.logits(h), in one pass. The loss is a weighted sum,
  so its gradient with respect to the logits, w (softmax - onehot), is known once they are: this
  pass also forms the gradients for the hidden states and the head's weight, which the backward
  only scales. Three matrix products and no [B, T, vocab] array kept for the backward, where
  autodiff of the plain loss keeps the logits and scatters into their gradient (on XLA:CPU
  the LM head + loss's forward + backward at 8 x 256 tokens: 228 -> 158 ms). chunk_size:
  positions per chunk (every row at once), the most logits that exist at a time; None: the
  whole sequence. Differentiate it once: its gradient is not itself differentiable."""
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
  targets_BT = jnp.clip(jnp.asarray(targets_BT), 0, model.cfg.vocab_size - 1).astype(jnp.int32)
  weights_BT = jnp.asarray(weights_BT).astype(jnp.float32)
  if targets_BT.shape != h_BTD.shape[:2] or weights_BT.shape != h_BTD.shape[:2]:
    raise ValueError(f"targets and weights must be [B, T] = {h_BTD.shape[:2]}; got "
                     f"{targets_BT.shape} and {weights_BT.shape}")
  chunks = _position_chunks((h_BTD, targets_BT, weights_BT), chunk_size or h_BTD.shape[1])[0]
  return _fused_ce(*chunks, model.head_weight(), jnp.dtype(model.cfg.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(h_NBCD, tgt_NBC, w_NBC, head_DV, dtype: str):
  return _fused_ce_fwd(h_NBCD, tgt_NBC, w_NBC, head_DV, dtype)[0]


def _fused_ce_fwd(h_NBCD, tgt_NBC, w_NBC, head_DV, dtype):
  dt, f32 = jnp.dtype(dtype), jnp.float32
  head = head_DV.astype(dt)

  def chunk(d_head, xs):
    h, tgt, w = xs
    z = constrain(token_dot(h.astype(dt), head, preferred_element_type=f32),
                  ("batch", "activation_length", "vocab"))
    top = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0]
    ce = top[..., 0] + jnp.log(total[..., 0]) - picked
    onehot = jnp.arange(z.shape[-1], dtype=jnp.int32) == tgt[..., None]
    dz = ((e / total - onehot) * w[..., None]).astype(dt)
    dh = token_dot(dz, head.T, preferred_element_type=f32).astype(h.dtype)
    d_head = d_head + jnp.tensordot(h.astype(dt), dz, ((0, 1), (0, 1)),
                                    preferred_element_type=f32)
    return d_head, (ce, dh)

  init = jnp.zeros(head_DV.shape, f32)
  if h_NBCD.shape[0] == 1:
    d_head, (ce, dh) = chunk(init, (h_NBCD[0], tgt_NBC[0], w_NBC[0]))
    ce, dh = ce[None], dh[None]
  else:
    d_head, (ce, dh) = jax.lax.scan(chunk, init, (h_NBCD, tgt_NBC, w_NBC))
  return jnp.sum(ce * w_NBC), (dh, d_head.astype(head_DV.dtype), ce, tgt_NBC)


def _fused_ce_bwd(dtype, res, g):
  dh, d_head, ce, tgt = res
  return ((g * dh).astype(dh.dtype), np.zeros(tgt.shape, jax.dtypes.float0), g * ce,
          (g * d_head).astype(d_head.dtype))


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def _shares_prefix(model, inputs_BT, start: int, group: int) -> bool:
  from coder_jax.parallel.expert import dropping_enabled
  b, t = jnp.shape(inputs_BT)
  # Dropping at expert capacity depends on which tokens share a batch: full rows then.
  drops = dropping_enabled() and model.cfg.capacity_factor is not None
  return (group > 1 and b % group == 0 and start + 1 < t and unsplit_context() == 1
          and model.cfg.attention_impl != "tokamax" and not drops)


def _prefix_once(model, inputs_BT, segment_ids_BT, positions_BT, start: int, g: int):
  """Hidden states at positions [start, T) and aux, columns [0, start] run once per run of g
  rows (token_logprobs' group)."""
  layout = token_layout(inputs_BT, segment_ids_BT, positions_BT)
  split = start + 1
  head = [a[::g, :split] for a in layout]
  h_p, aux_p = model.hidden_states(*head, return_cache=True)
  h_r, aux_r = model.hidden_states(*(a[:, split:] for a in layout),
                                   prefix=(aux_p["cache"], head[1], g))
  h = jnp.concatenate([jnp.repeat(h_p[:, -1:], g, axis=0), h_r], axis=1)
  # Each row's router stats: its run's prefix's and its own ([layers, rows, ...] each).
  router = [jax.tree.map(lambda p, r: jnp.repeat(p, g, axis=1) + r, sp, sr)
            for sp, sr in zip(aux_p["router"], aux_r["router"])]
  return h, {"router": router}


def token_logprobs(model, inputs_BT, targets_BT, segment_ids_BT=None, positions_BT=None, *,
                   chunk_size: int = 1024, temperature=1.0, return_entropy: bool = False,
                   return_aux: bool = False, start: int = 0, group: int = 1):
  """log softmax(logits / temperature)[target] per position, float32 [B, T]; differentiable.

  inputs_BT / segment_ids_BT / positions_BT: as for the model's forward. targets_BT: the id
  whose log-probability each position gets (for a causal LM, the next input); ids outside
  [0, vocab) are clamped, so give padding any id and mask it. chunk_size: positions per chunk
  (every row at once); at most [B, chunk_size, vocab] logits exist at any time (per device:
  its rows of them). temperature: the sampler's (> 0); the log-probabilities of a sampled
  token under the distribution it was drawn from, before top-k / top-p filtering.
  start: the first position whose log-probability is wanted (TRL's `logits_to_keep` from the
  other end): the vocabulary projection runs on positions [start, T) only; earlier positions
  get 0 (and entropy 0). GRPO puts every response after a fixed prompt slot for this.
  group: rows come in runs of `group` that hold the same tokens in columns [0, start] (GRPO's
  samples of one prompt, in the prompt slot): those columns run through the model once per run
  and the rest of each row attends to them (MLAttention's prefix), the same numbers as each row
  in full, for about (start + 1) (group - 1) / group fewer tokens a row. The router stats in aux
  are each row's as before. Ignored (every row in full) when the rows are not whole runs, when
  nothing follows column start, or where a shared prefix is not supported (a context axis > 1;
  tokamax attention) or would change the numbers (tokens dropped at expert capacity).

  Returns logp_BT; with return_entropy / return_aux a tuple (logp_BT, [entropy_BT], [aux]):
  entropy of the tempered distribution per position, and the forward's aux dict ({'router':
  per MoE run the [layers, B, E] stats that the balance losses take}).
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")
  targets_BT = jnp.asarray(targets_BT)
  if targets_BT.shape != jnp.shape(inputs_BT):
    raise ValueError(f"targets must have the shape of inputs {jnp.shape(inputs_BT)}, "
                     f"got {targets_BT.shape}")
  t_all = targets_BT.shape[1]
  if not isinstance(start, int) or not 0 <= start < t_all:
    raise ValueError(f"start must be an int in [0, {t_all}); got {start!r}")
  if not isinstance(group, int) or group < 1:
    raise ValueError(f"group must be a positive int; got {group!r}")
  if _shares_prefix(model, inputs_BT, start, group):
    h_BTD, aux = _prefix_once(model, inputs_BT, segment_ids_BT, positions_BT, start, group)
  else:
    h_BTD, aux = model.hidden_states(inputs_BT, segment_ids_BT, positions_BT)
    h_BTD = h_BTD[:, start:]
  targets_BT = jnp.clip(targets_BT[:, start:], 0, model.cfg.vocab_size - 1).astype(jnp.int32)
  b, t, _ = h_BTD.shape
  (h_NBCD, tgt_NBC), (n, c) = _position_chunks((h_BTD, targets_BT), chunk_size)
  temperature = jnp.asarray(temperature, jnp.float32)

  # Rematerialised: scan's backward would otherwise stack every chunk's softmax residuals, the
  # full [B, T, vocab] this function exists to avoid.
  @jax.checkpoint
  def one(h_BCD, tgt_BC):
    return _chunk_stats(model, h_BCD, tgt_BC, temperature, return_entropy)

  def body(_, xs):
    return None, one(*xs)

  if n == 1:
    logp_NBC, ent_NBC = jax.tree.map(lambda a: a[None], one(h_NBCD[0], tgt_NBC[0]))
  else:
    _, (logp_NBC, ent_NBC) = jax.lax.scan(body, None, (h_NBCD, tgt_NBC))

  def unchunk(x_NBC):
    return jnp.pad(x_NBC.swapaxes(0, 1).reshape(b, n * c)[:, :t], ((0, 0), (start, 0)))

  out = (unchunk(logp_NBC),)
  if return_entropy:
    out += (unchunk(ent_NBC),)
  if return_aux:
    out += (aux,)
  return out[0] if len(out) == 1 else out
