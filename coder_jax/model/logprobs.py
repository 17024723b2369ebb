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

from coder_jax.model.decoder import segment_positions
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


def _shares_prefix(model, inputs_BT, start: int, group: int) -> bool:
  b, t = jnp.shape(inputs_BT)
  return (group > 1 and b % group == 0 and start + 1 < t and unsplit_context() == 1
          and model.cfg.attention_impl != "tokamax")


def _prefix_once(model, inputs_BT, segment_ids_BT, positions_BT, start: int, g: int):
  """Hidden states at positions [start, T) and aux, columns [0, start] run once per run of g
  rows (token_logprobs' group)."""
  inputs_BT = jnp.asarray(inputs_BT)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones(inputs_BT.shape, jnp.int32)
  if positions_BT is None:
    positions_BT = segment_positions(jnp.asarray(segment_ids_BT))
  split = start + 1
  head = lambda a: jnp.asarray(a)[::g, :split]
  tail = lambda a: jnp.asarray(a)[:, split:]
  h_p, aux_p = model.hidden_states(head(inputs_BT), head(segment_ids_BT), head(positions_BT),
                                   return_cache=True)
  h_r, aux_r = model.hidden_states(tail(inputs_BT), tail(segment_ids_BT), tail(positions_BT),
                                   prefix=(aux_p["cache"], head(segment_ids_BT), g))
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
  tokamax attention).

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
  targets_BT = targets_BT[:, start:]
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
