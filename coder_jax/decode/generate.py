"""Batched generation: one prefill, then one jitted loop of single-token steps over the cache.

Prompts are right-padded to a shared bucketed length; every row keeps its own length, so row b's
k-th new token sits at position len_b + k and attends to cache entries [0, len_b + k]. The whole
loop (prefill, sampling, cache writes, stop checks) is one compiled program with fixed shapes,
stopping early once every row has finished.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.decode import cache as cache_lib
from coder_jax.decode.attention import get_decode_attention
from coder_jax.decode.sampling import chosen_logprob, sample
from coder_jax.model.kernels import target_platform
from coder_jax.model.rope import rope_tables

FINISH = ("length", "eos", "stop")
_NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class Generated:
  """Equality compares what was generated (tokens, finish reasons), not the float logprobs,
  which may differ in the last bits between equivalent programs (scanned or unrolled layers)."""
  tokens: list[list[int]]          # new tokens per row (EOS and what follows excluded)
  finish_reason: list[str]         # "eos", "stop" (a stop token sequence) or "length"
  # Per row, aligned with tokens: log softmax(logits / temperature) of each token (temperature
  # 1 when greedy), before top-k / top-p filtering (see sampling.chosen_logprob).
  logprobs: list[list[float]] = dataclasses.field(default=None, compare=False)
  # The EOS token's log-probability for rows that finished with "eos" (it is not in tokens,
  # but a policy gradient should still credit the choice to stop), else None.
  eos_logprob: list[float | None] = dataclasses.field(default=None, compare=False)


def _bucket(n: int, multiple: int = 16) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def _stop_table(stop_ids: Sequence[Sequence[int]]):
  """[n, L] right-aligned stop sequences, -1 = no constraint (at least one row, never matching)."""
  seqs = [list(s) for s in stop_ids if len(s)]
  width = max([len(s) for s in seqs] + [1])
  table = np.full((max(len(seqs), 1), width), -1, np.int32)
  live = np.zeros(table.shape[0], bool)
  for i, s in enumerate(seqs):
    table[i, width - len(s):] = s
    live[i] = True
  return jnp.asarray(table), jnp.asarray(live)


def _decode_step(model, cache, tokens_B, positions_B, attend, layers=None):
  """Logits [B, V] for one new token per row, and the cache with its entries written.
  layers: per run of layers, its `unstacked()` layers (default: sliced from the stacks)."""
  x = model.embed(jnp.maximum(tokens_B, 0)[:, None])
  cos, sin = rope_tables(model.cfg, positions_B[:, None])
  pairs, new = cache.layer_pairs(), []
  for r, stack in enumerate(model.stacks):
    mine, pairs = pairs[:stack.n], pairs[stack.n:]
    x, written = stack.decode(x, cos, sin, mine, positions_B, attend,
                              None if layers is None else layers[r])
    new += written
  logits = model.logits(model.norm(x))[:, 0]
  return logits, cache_lib.from_layers(new)


def decode_layers(model):
  """The layers a decode loop should use, taken once before it: on XLA:CPU each layer's weights
  copied out of the stacks (a dot there copies a slice of a stacked weight before reading it,
  which at every token would cost more than the step's math); elsewhere None (compilers for
  GPU and TPU read a layer's slice of the stack in place)."""
  if target_platform() != "cpu":
    return None
  return [stack.unstacked() for stack in model.stacks]


def prefill(model, prompt_BT, lengths_B, max_length: int):
  """(logits [B, V] at each row's last prompt token, cache of `max_length` positions)."""
  t = prompt_BT.shape[1]
  seg = (jnp.arange(t)[None, :] < lengths_B[:, None]).astype(jnp.int32)  # 0 = padding
  h, aux = model.hidden_states(prompt_BT, seg, return_cache=True)
  last = h[jnp.arange(h.shape[0]), lengths_B - 1][:, None]
  cache = cache_lib.from_prefill(aux["cache"], max_length, model.cfg.dtype)
  return model.logits(last)[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("max_new_tokens", "attend", "group"))
def _generate(graphdef, state, prompt_BT, lengths_B, key, temperature, top_k, top_p, eos_id,
              stop_table, stop_live, *, max_new_tokens: int, attend: str, group: int = 1):
  """group > 1: rows come in runs of `group` copies of one prompt; each run's prompt is
  prefilled once and its logits and cache rows are copied to the run's rows."""
  model = nnx.merge(graphdef, state)
  attend_fn = get_decode_attention(attend)
  b, t = prompt_BT.shape
  logits, cache = prefill(model, prompt_BT[::group], lengths_B[::group], t + max_new_tokens)
  if group > 1:
    logits = jnp.repeat(logits, group, axis=0)
    cache = cache_lib.pin(jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), cache))
  layers = decode_layers(model)
  window = jnp.full((b, stop_table.shape[1]), -2, jnp.int32)
  carry = dict(i=jnp.int32(0), pos=lengths_B, cache=cache, logits=logits,
               done=jnp.zeros((b,), bool),
               reason=jnp.zeros((b,), jnp.int32), window=window,
               out=jnp.full((b, max_new_tokens), _NO_TOKEN, jnp.int32),
               logp=jnp.zeros((b, max_new_tokens), jnp.float32))

  def cond(c):
    return (c["i"] < max_new_tokens) & ~jnp.all(c["done"])

  def body(c):
    i = c["i"]
    tok = sample(c["logits"], jax.random.fold_in(key, i), temperature=temperature, top_k=top_k,
                 top_p=top_p)
    logp = chosen_logprob(c["logits"], tok, temperature=temperature)
    tok = jnp.where(c["done"], _NO_TOKEN, tok)
    window = jnp.concatenate([c["window"][:, 1:], tok[:, None]], axis=1)
    match = jnp.all((stop_table[None] < 0) | (window[:, None, :] == stop_table[None]), axis=-1)
    hit_stop = jnp.any(match & stop_live[None], axis=-1)
    hit_eos = tok == eos_id
    live = ~c["done"]
    reason = jnp.where(live & hit_eos, 1, jnp.where(live & hit_stop, 2, c["reason"]))
    # A row that has finished stays at its last position: its (discarded) steps rewrite that
    # cache slot and attend over no more entries, so with the decode kernels, which skip cache
    # blocks past each row's length, finished rows stop costing attention work.
    pos = jnp.where(c["done"], c["pos"], lengths_B + i)
    logits, cache = _decode_step(model, c["cache"], tok, pos, attend_fn, layers)
    return dict(i=i + 1, pos=pos, cache=cache, logits=logits,
                done=c["done"] | hit_eos | hit_stop,
                reason=reason, window=window, out=c["out"].at[:, i].set(tok),
                logp=c["logp"].at[:, i].set(logp))

  final = jax.lax.while_loop(cond, body, carry)
  return final["out"], final["reason"], final["logp"]


def sampler_rows(n: int, group_size: int, split: int) -> tuple[int, int]:
  """(rows, prefill group) for n prompts in runs of group_size, over `split` devices sharing
  the rows: rows padded to whole runs on whole shards; the runs prefilled once each when they
  too divide over the devices, else every row prefilled (group 1: the same samples)."""
  rows = -(-n // math.lcm(split, group_size)) * math.lcm(split, group_size)
  return rows, group_size if (rows // group_size) % split == 0 else 1


def _check_settings(max_new_tokens, temperature, top_k, top_p):
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off); got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p}")


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, stop_ids: Sequence[Sequence[int]] = (), seed: int = 0,
                 attention_impl: str = "auto", mesh=None,
                 prompt_slot: int | None = None, group_size: int = 1) -> Generated:
  """Token-level generation for a batch of token-id prompts (see `generate` for the settings).

  mesh: run sharded like training (parameters as they are placed; rows over the batch axes);
  the batch is padded to a multiple of the devices that split it.
  prompt_slot: pad every batch's prompts to this many tokens (at least the longest), so that
  batches of other prompt lengths reuse one compiled program; default: the longest prompt
  rounded up to a multiple of 16 (a new multiple compiles again).
  group_size: the prompts come in consecutive runs of this many identical prompts (GRPO's G
  samples of a prompt); each run is prefilled once and its cache copied to its rows. The
  samples are those of prefilling every row (the same rows, keys and settings).
  """
  _check_settings(max_new_tokens, temperature, top_k, top_p)
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (add a BOS token to empty prompts)")
  vocab = model.cfg.vocab_size
  if any(not 0 <= x < vocab for p in prompts for x in p):
    raise ValueError(f"prompt token ids must be in [0, {vocab})")
  if model.cfg.max_position_embeddings and max(map(len, prompts)) + max_new_tokens > \
      model.cfg.max_position_embeddings:
    raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings "
                     f"{model.cfg.max_position_embeddings}")
  n = len(prompts)
  if not isinstance(group_size, int) or group_size < 1 or n % group_size or any(
      prompts[i] != prompts[i - i % group_size] for i in range(n)):
    raise ValueError(f"group_size {group_size!r}: the {n} prompts must come in runs of "
                     f"group_size identical prompts")
  split = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")
                                              if a in mesh.shape]))
  rows, group = sampler_rows(n, group_size, split)
  longest = max(map(len, prompts))
  if prompt_slot is not None and prompt_slot < longest:
    raise ValueError(f"prompt_slot {prompt_slot} is shorter than the longest prompt ({longest})")
  t = _bucket(longest) if prompt_slot is None else prompt_slot
  ids = np.zeros((rows, t), np.int32)
  lengths = np.ones((rows,), np.int32)
  for i, p in enumerate(prompts + [prompts[0]] * (rows - n)):
    ids[i, :len(p)] = p
    lengths[i] = len(p)
  table, live = _stop_table(stop_ids)
  graphdef, state = nnx.split(model)
  args = (graphdef, state, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
          jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
          jnp.int32(-1 if eos_id is None else eos_id), table, live)
  if mesh is not None:
    with jax.set_mesh(mesh):
      out, reason, logp = _generate(*args, max_new_tokens=max_new_tokens,
                                    attend=attention_impl, group=group)
  else:
    out, reason, logp = _generate(*args, max_new_tokens=max_new_tokens, attend=attention_impl,
                                  group=group)
  out, reason, logp = np.asarray(out)[:n], np.asarray(reason)[:n], np.asarray(logp)[:n]
  tokens, logprobs, eos_logprob = [], [], []
  for row, r, lp in zip(out, reason, logp):
    k = int(np.sum(row != _NO_TOKEN))     # a row's tokens are a prefix: it only ever stops
    row, lp = [int(x) for x in row[:k]], [float(x) for x in lp[:k]]
    eos_logprob.append(lp[-1] if r == 1 else None)
    if r == 1:
      row, lp = row[:-1], lp[:-1]    # the EOS itself
    tokens.append(row)
    logprobs.append(lp)
  return Generated(tokens, [FINISH[int(r)] for r in reason], logprobs, eos_logprob)
