"""Chunked per-token log-probabilities against the full logits' log-softmax (values, entropy,
gradients), the size of the largest vocab-wide buffer in the compiled program, and the sampler's
log-probabilities against the training forward on the same tokens."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coder_jax.decode import generate_ids
from coder_jax.model import get_config, init_model
from coder_jax.model.logprobs import _shares_prefix, token_logprobs

TINY = get_config("tiny", dtype="float32")
B, T = 3, 14
# Packed row (two documents), a right-padded row (segment 0), a full row.
SEGMENTS = np.array([[1] * 6 + [2] * 8, [1] * 10 + [0] * 4, [1] * 14], np.int32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TINY.vocab_size, (B, T + 1))
  return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(SEGMENTS)


def _oracle(model, inputs, targets, seg, temperature):
  """float64 log-softmax and entropy of the full [B, T, V] logits."""
  z = np.asarray(model(inputs, seg), np.float64) / temperature
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return picked, -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1024, 7, 4], ids=["one_chunk", "divides", "pads"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_log_softmax_of_full_logits(chunk_size, temperature):
  model = init_model(TINY, seed=0)
  inputs, targets, seg = _batch()
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s: token_logprobs(nnx.merge(graphdef, s), inputs, targets, seg,
                                       chunk_size=chunk_size, temperature=temperature,
                                       return_entropy=True, return_aux=True))
  logp, ent, aux = f(state)
  want_logp, want_ent = _oracle(model, inputs, targets, seg, temperature)
  assert logp.dtype == jnp.float32 and logp.shape == (B, T)
  assert _rel(logp, want_logp) <= 1e-5 and _rel(ent, want_ent) <= 1e-5
  assert len(aux["router"]) == 1 and aux["router"][0]["count"].shape[1:] == (B, 8)


@pytest.mark.parametrize("chunk_size", [7, 4], ids=["divides", "pads"])
def test_gradients_equal_those_through_full_logits(chunk_size):
  """d/dparams of a weighted sum of log-probabilities and entropies (what GRPO's loss and an
  entropy bonus differentiate)."""
  model = init_model(TINY, seed=1)
  inputs, targets, seg = _batch(1)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)), jnp.float32)
  graphdef, state = nnx.split(model)

  def chunked(s):
    logp, ent = token_logprobs(nnx.merge(graphdef, s), inputs, targets, seg,
                               chunk_size=chunk_size, temperature=0.7, return_entropy=True)
    return jnp.sum(w * logp) + 0.1 * jnp.sum(w * ent)

  def full(s):
    z = nnx.merge(graphdef, s)(inputs, seg) / 0.7
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    return jnp.sum(w * logp) + 0.1 * jnp.sum(w * ent)

  got = jax.jit(jax.grad(chunked))(state)
  want = jax.jit(jax.grad(full))(state)
  flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want) > 10
  for g, h in zip(flat_got, flat_want):
    if np.any(np.asarray(h)):
      assert _rel(g, h) <= 1e-5


@pytest.mark.parametrize("start", [5, 13])
def test_start_skips_earlier_positions_values_and_gradients(start):
  """Positions before `start` are 0; later ones and the gradient of their weighted sum are the
  full computation's (the projection runs on T - start positions)."""
  model = init_model(TINY, seed=3)
  inputs, targets, seg = _batch(3)
  graphdef, state = nnx.split(model)
  keep = jnp.asarray(np.arange(T) >= start, jnp.float32)[None]
  w = jnp.asarray(np.random.default_rng(4).normal(size=(B, T)), jnp.float32) * keep

  def f(s, start):
    logp, ent = token_logprobs(nnx.merge(graphdef, s), inputs, targets, seg, chunk_size=4,
                               temperature=0.7, return_entropy=True, start=start)
    return jnp.sum(w * logp) + 0.1 * jnp.sum(w * ent), (logp, ent)

  (_, (logp, ent)), got = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)(state,
                                                                                       start)
  want_logp, want_ent = _oracle(model, inputs, targets, seg, 0.7)
  assert logp.shape == (B, T) and not np.any(np.asarray(logp)[:, :start])
  assert not np.any(np.asarray(ent)[:, :start])
  assert _rel(np.asarray(logp)[:, start:], want_logp[:, start:]) <= 1e-5
  assert _rel(np.asarray(ent)[:, start:], want_ent[:, start:]) <= 1e-5
  want = jax.jit(jax.grad(lambda s: f(s, 0)[0]))(state)
  for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if np.any(np.asarray(h)):
      assert _rel(g, h) <= 1e-5


def _grpo_rows(cfg, slot, t, group, prompt_lengths, seed):
  """GRPO's layout: runs of `group` rows, one prompt each, left-padded (segment 0) to end at
  column slot - 1, then a response of its own length (1 to t - slot) and right padding."""
  rng = np.random.default_rng(seed)
  rows = len(prompt_lengths) * group
  inputs, seg, pos = (np.zeros((rows, t), np.int32) for _ in range(3))
  for i, n in enumerate(prompt_lengths):
    prompt = rng.integers(3, cfg.vocab_size, n)
    for j in range(group):
      row = np.concatenate([prompt, rng.integers(3, cfg.vocab_size, rng.integers(1, t - slot + 1))])
      o, r = slot - n, i * group + j
      inputs[r, o:o + len(row)], seg[r, o:o + len(row)] = row, 1
      pos[r, o:o + len(row)] = np.arange(len(row))
  targets = np.roll(inputs, -1, axis=1)
  return [jnp.asarray(a) for a in (inputs, targets, seg, pos)]


@pytest.mark.parametrize("cfg", [
    get_config("tiny", dtype="float32", moe_impl="auto"),
    get_config("tiny", dtype="float32", q_lora_rank=24, topk_method="group_limited_greedy",
               n_group=4, topk_group=2, scan_layers=True, remat_policy="full")],
    ids=["tiny_unrolled", "qlora_groups_scan_remat"])
def test_shared_prompt_columns_run_once_with_the_same_numbers(cfg):
  """group: each run's prompt columns through the model once, the responses attending to them.
  Log-probabilities, entropy, the router stats per row and the gradient of a weighted sum equal
  every row in full (float64 numpy's log-softmax of the full logits as well)."""
  model = init_model(cfg, seed=5)
  slot, t, g = 9, 17, 4
  inputs, targets, seg, pos = _grpo_rows(cfg, slot, t, g, [5, 9, 1], seed=6)
  mask = np.asarray(seg, bool) & (np.arange(t) >= slot - 1)
  assert _shares_prefix(model, inputs, slot - 1, g)        # the shared path, not a fallback
  w = jnp.asarray(np.random.default_rng(7).normal(size=mask.shape) * mask, jnp.float32)
  graphdef, state = nnx.split(model)

  def f(s, group):
    logp, ent, aux = token_logprobs(nnx.merge(graphdef, s), inputs, targets, seg, pos,
                                    chunk_size=8, temperature=0.7, return_entropy=True,
                                    return_aux=True, start=slot - 1, group=group)
    return jnp.sum(w * logp) + 0.1 * jnp.sum(w * ent), (logp, ent, aux["router"])

  run = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
  (_, (logp, ent, router)), grads = run(state, g)
  (_, (logp1, ent1, router1)), grads1 = run(state, 1)
  z = np.asarray(model(inputs, seg, pos), np.float64) / 0.7
  want = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0] - np.log(
      np.exp(z - z.max(-1, keepdims=True)).sum(-1)) - z.max(-1)
  assert _rel(np.asarray(logp)[mask], want[mask]) <= 1e-5
  assert _rel(np.asarray(logp)[mask], np.asarray(logp1)[mask]) <= 1e-5
  assert _rel(np.asarray(ent)[mask], np.asarray(ent1)[mask]) <= 1e-5
  assert len(router) == len(router1) == 1
  for key in router1[0]:
    np.testing.assert_allclose(router[0][key], router1[0][key], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
    if np.any(np.asarray(b)):
      assert _rel(a, b) <= 1e-4
  # With tokens dropped at expert capacity (training), rows run in full: which copies are
  # dropped depends on the tokens a batch holds.
  from coder_jax.parallel.expert import token_dropping
  with token_dropping():
    assert _shares_prefix(model, inputs, slot - 1, g)
    dropping = init_model(cfg.replace(capacity_factor=1.25), seed=5)
    assert not _shares_prefix(dropping, inputs, slot - 1, g)
  # Rows that are not whole runs (3 of them, runs of 4) run in full: the same numbers.
  part = token_logprobs(model, inputs[:3], targets[:3], seg[:3], pos[:3], start=slot - 1,
                        temperature=0.7, group=g)
  assert _rel(np.asarray(part)[mask[:3]], np.asarray(logp1)[:3][mask[:3]]) <= 1e-5


@pytest.mark.parametrize("tied, chunk", [(False, None), (False, 4), (True, 5), (True, 14)],
                         ids=["whole", "chunks_divide", "tied_chunks_pad", "tied_one_chunk"])
def test_cross_entropy_from_hidden_equals_autodiff_of_the_plain_loss(tied, chunk):
  """The one-pass loss (gradients formed in the forward) against float64 numpy's weighted
  cross-entropy and against jax.grad of cross_entropy_sum over the full logits: the value, and
  the gradients for every parameter (the head, or the tied embedding) and for the weights."""
  from coder_jax.model.logprobs import cross_entropy_from_hidden
  from coder_jax.train.losses import cross_entropy_sum
  cfg = get_config("tiny", dtype="float32", tie_word_embeddings=tied)
  graphdef, state = nnx.split(init_model(cfg, seed=4))
  inputs, targets, seg = _batch(5)
  w = jnp.asarray(np.random.default_rng(6).uniform(size=(B, T)) * SEGMENTS.astype(bool),
                  jnp.float32)

  def plain(s, w):
    return cross_entropy_sum(nnx.merge(graphdef, s)(inputs, seg), targets, w)

  def fused(s, w):
    model = nnx.merge(graphdef, s)
    h, _ = model.hidden_states(inputs, seg)
    return cross_entropy_from_hidden(model, h, targets, w, chunk_size=chunk)

  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(state, w)
  got, got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(state, w)
  z = np.asarray(nnx.merge(graphdef, state)(inputs, seg), np.float64)
  top = z.max(-1)
  ce = top + np.log(np.exp(z - top[..., None]).sum(-1)) - np.take_along_axis(
      z, np.asarray(targets)[..., None], -1)[..., 0]
  assert _rel(got, np.sum(ce * np.asarray(w))) <= 1e-5 and _rel(got, want) <= 1e-5
  assert _rel(got_grads[1], ce) <= 1e-5                     # d loss / d weights
  leaves = list(zip(jax.tree.leaves(got_grads[0]), jax.tree.leaves(want_grads[0])))
  assert len(leaves) > 10
  for g, h in leaves:
    if np.any(np.asarray(h)):
      assert _rel(g, h) <= 1e-5


def test_cross_entropy_from_hidden_rejects_bad_arguments():
  from coder_jax.model.logprobs import cross_entropy_from_hidden
  model = init_model(TINY, seed=0)
  h = jnp.zeros((2, 4, TINY.hidden_size))
  ok = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
    cross_entropy_from_hidden(model, h, ok, ok, chunk_size=0)
  with pytest.raises(ValueError, match=r"targets and weights must be \[B, T\]"):
    cross_entropy_from_hidden(model, h, ok[:, :3], ok)


def _vocab_buffers(hlo: str, vocab: int) -> list[int]:
  """Element counts of every f32 array in the HLO text with a dimension of size `vocab`."""
  sizes = []
  for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
    shape = [int(d) for d in dims.split(",")]
    if vocab in shape:
      sizes.append(int(np.prod(shape)))
  return sizes


def test_no_buffer_larger_than_one_chunk_of_logits():
  """The compiled forward + backward (w.r.t. the parameters) holds no vocab-wide f32 array
  larger than one chunk of logits or the [hidden, vocab] weights; without chunking the same
  inspection finds the whole [B, T, V]."""
  vocab, b, t, chunk = 5003, 2, 128, 16
  cfg = get_config("tiny", dtype="float32", vocab_size=vocab, num_hidden_layers=2)
  graphdef, state = nnx.split(init_model(cfg, seed=0))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (b, t)))

  def hlo(chunk_size):
    def f(s):
      return token_logprobs(nnx.merge(graphdef, s), ids, jnp.roll(ids, -1, 1),
                            chunk_size=chunk_size).sum()
    return jax.jit(jax.grad(f)).lower(state).compile().as_text()

  assert b * chunk < cfg.hidden_size < t     # so the three sizes below are told apart
  chunked = _vocab_buffers(hlo(chunk), vocab)
  assert max(chunked) == cfg.hidden_size * vocab      # the weights and their gradient
  assert b * chunk * vocab in chunked                 # one chunk of logits
  assert max(_vocab_buffers(hlo(t), vocab)) == b * t * vocab


PROMPTS = [[1, 40, 41, 42], [1, 7, 8, 9, 10, 11, 12, 13, 14], [1, 99]]


def _training_logprobs(model, prompts, generated, temperature):
  """token_logprobs of the generated tokens, recomputed by one padded training forward."""
  rows = [p + g for p, g in zip(prompts, generated)]
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t + 1), np.int32)
  seg = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    seg[i, :len(r)] = 1
  logp = np.asarray(token_logprobs(model, jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]),
                                   jnp.asarray(seg), chunk_size=8, temperature=temperature))
  # Position len(p) - 1 + k predicts generated token k.
  return [logp[i, len(p) - 1:len(p) - 1 + len(g)] for i, (p, g) in
          enumerate(zip(prompts, generated))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)],
                         ids=["t1", "t0.7_filtered", "greedy"])
def test_sampler_logprobs_equal_the_training_forward(temperature, top_k, top_p):
  """Rows of different prompt lengths: each sampled token's log-probability, as the sampler
  reports it, equals the training forward's on prompt + generated tokens (greedy counts as
  temperature 1; filters do not change it)."""
  model = init_model(TINY, seed=2)
  out = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=3)
  assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens] == [12] * 3
  assert out.eos_logprob == [None] * 3
  want = _training_logprobs(model, PROMPTS, out.tokens, temperature or 1.0)
  for got, w in zip(out.logprobs, want):
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6)
  if temperature:   # the sampler really sampled: not every token is the most likely one
    greedy = generate_ids(model, PROMPTS, max_new_tokens=12).tokens
    assert out.tokens != greedy


def test_eos_logprob_is_that_of_the_stopping_token():
  model = init_model(TINY, seed=2)
  kw = dict(max_new_tokens=12, temperature=1.0, seed=4)
  base = generate_ids(model, PROMPTS, **kw)
  eos = base.tokens[0][3]
  out = generate_ids(model, PROMPTS, eos_id=eos, **kw)
  stop = base.tokens[0].index(eos)
  assert out.finish_reason[0] == "eos" and out.tokens[0] == base.tokens[0][:stop]
  assert out.logprobs[0] == base.logprobs[0][:stop]
  assert out.eos_logprob[0] == base.logprobs[0][stop]
  want = _training_logprobs(model, PROMPTS[:1], [base.tokens[0][:stop + 1]], 1.0)[0]
  np.testing.assert_allclose(out.eos_logprob[0], want[-1], rtol=1e-4)


@pytest.mark.parametrize("kw, msg", [
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(start=4), r"start must be an int in \[0, 4\)"),
    (dict(start=-1), r"start must be an int in \[0, 4\)"),
    (dict(targets=jnp.zeros((1, 3), jnp.int32)), "targets must have the shape of inputs"),
    (dict(group=0), "group must be a positive int"),
])
def test_bad_arguments_raise_clear_errors(kw, msg):
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=msg):
    token_logprobs(init_model(TINY, seed=0), ids, kw.pop("targets", ids), **kw)
