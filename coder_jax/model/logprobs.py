"""Per-token log-probabilities of given targets without the whole [B, T, vocab] logits.

With a 102400-token vocabulary the logits of a GRPO batch dwarf everything else the forward
keeps (8 rows x 4096 tokens is 13 GB in float32), yet the loss needs one number per token. So
the sequence is cut into chunks of positions and a scan computes, chunk by chunk, the logits,
their log-softmax at the targets (and the entropy); each chunk is rematerialised in the backward
pass, so neither direction holds more than one chunk [B, chunk, vocab] of logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from coder_jax.parallel.rules import constrain


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


def token_logprobs(model, inputs_BT, targets_BT, segment_ids_BT=None, positions_BT=None, *,
                   chunk_size: int = 1024, temperature=1.0, return_entropy: bool = False,
                   return_aux: bool = False, start: int = 0):
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
  h_BTD, aux = model.hidden_states(inputs_BT, segment_ids_BT, positions_BT)
  h_BTD, targets_BT = h_BTD[:, start:], targets_BT[:, start:]
  b, t, d = h_BTD.shape
  n = -(-t // chunk_size)
  c = -(-t // n)                     # balanced chunks: the padding stays under n positions
  pad = n * c - t
  targets_BT = jnp.clip(targets_BT, 0, model.cfg.vocab_size - 1).astype(jnp.int32)
  h_NBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
  tgt_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
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
