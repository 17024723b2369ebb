"""Decoding with the latent KV cache against the full forward pass, sampling against numpy,
stopping rules, batching, sharding, the text API and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coder_jax.decode import (cache_bytes_per_token, cut_at_stop, filter_logits, generate,
                              generate_ids, prefill, sample, values_per_token)
from coder_jax.decode.attention import get_decode_attention
from coder_jax.decode.generate import _decode_step, sampler_rows
from coder_jax.decode.sampling import first_max
from coder_jax.model import get_config, init_model

TINY = get_config("tiny", dtype="float32", moe_impl="dense")
# q_lora + YaRN (softmax mscale^2, positions past the original window) + routed scaling.
YARN = get_config("tiny", dtype="float32", moe_impl="dense", q_lora_rank=24,
                  rope_scaling=dict(factor=4.0, original_max_position_embeddings=8,
                                    beta_fast=32, beta_slow=1, mscale=0.707,
                                    mscale_all_dim=0.707),
                  routed_scaling_factor=2.5)


# The expert path decoding takes by default (`auto`: on CPU the tiled scan, which picks the
# gathered experts for fewer copies than experts, the dense product for a few rows and the
# slotted product for more) with group-limited routing.
AUTO_GROUPS = get_config("tiny", dtype="float32", moe_impl="auto", q_lora_rank=24,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("cfg,lengths", [
    (TINY, [4, 13, 9]), (YARN, [4, 13, 9]), (AUTO_GROUPS, [4, 13, 9]), (AUTO_GROUPS, [7]),
    (AUTO_GROUPS, [3, 16, 5, 9, 1, 12, 8, 2]), (AUTO_GROUPS, [3, 16, 5, 9, 1, 12] * 4)],
    ids=["tiny", "qlora_yarn", "auto_groups_gathered", "auto_groups_batch1",
         "auto_groups_dense", "auto_groups_slotted"])
def test_cached_decoding_equals_full_forward_at_every_position(cfg, lengths):
  """Rows of different prompt lengths, prefilled together, then fed the true next tokens one at
  a time: every step's logits equal the full forward's at that position, and its argmax the
  full forward's. With `auto` experts the decode steps take the gathered experts (fewer copies
  than experts: 3 rows and 1 row x top-2 of 8), the dense product (8 rows) or the slotted one
  (24 rows: 8 slots per expert, and the dense product at a step where a group is larger), the
  prefill the tiled scan; the layers come sliced from the stacks or unstacked once (decode_layers)."""
  model = init_model(cfg, seed=1)
  rng = np.random.default_rng(0)
  b, lengths = len(lengths), np.array(lengths)
  full = rng.integers(3, cfg.vocab_size, (b, 24))
  want = np.asarray(model(jnp.asarray(full)))
  prompt = np.zeros((b, 16), np.int32)
  for i, n in enumerate(lengths):
    prompt[i, :n] = full[i, :n]
  logits, cache = prefill(model, jnp.asarray(prompt), jnp.asarray(lengths), 16 + 8)
  for i, n in enumerate(lengths):
    assert _rel(logits[i], want[i, n - 1]) <= 1e-4
  attend = get_decode_attention("reference")
  layers = [s.unstacked() for s in model.stacks]
  step = jax.jit(lambda c, t, p: _decode_step(model, c, t, p, attend))
  step_unstacked = jax.jit(lambda c, t, p: _decode_step(model, c, t, p, attend, layers))
  for k in range(8):
    pos = lengths + k
    args = (jnp.asarray(full[np.arange(b), pos]), jnp.asarray(pos))
    other, _ = step_unstacked(cache, *args)
    logits, cache = step(cache, *args)
    np.testing.assert_allclose(other, logits, rtol=1e-6, atol=1e-6)
    for i in range(b):
      assert _rel(logits[i], want[i, pos[i]]) <= 1e-4, (k, i)
      assert int(np.argmax(logits[i])) == int(np.argmax(want[i, pos[i]])), (k, i)


def test_decode_step_writes_the_cache_in_place():
  """A decode step with the cache donated aliases every cache buffer to its output and holds
  no temporary as large as one layer's cache (no copy of a layer's slice to write one entry)."""
  model = init_model(get_config("tiny", dtype="float32", moe_impl="auto"), seed=0)
  b, s = 4, 2048
  _, cache = prefill(model, jnp.ones((b, 8), jnp.int32), jnp.full((b,), 8), s)
  attend = get_decode_attention("reference")
  layers = [st.unstacked() for st in model.stacks]
  step = jax.jit(lambda c, t, p: _decode_step(model, c, t, p, attend, layers), donate_argnums=0)
  mem = step.lower(cache, jnp.ones((b,), jnp.int32), jnp.full((b,), 8)).compile(
      ).memory_analysis()
  one_layer = cache.latent[0].nbytes + cache.rope[0].nbytes
  assert len(cache.latent) == model.cfg.num_hidden_layers
  assert mem.alias_size_in_bytes == cache.nbytes()
  # What is left is the scores and probabilities ([B, H, S]: 0.1 of a layer for tiny).
  assert mem.temp_size_in_bytes < one_layer / 2, (mem.temp_size_in_bytes, one_layer)


def test_cache_holds_only_latent_and_rope_key():
  assert values_per_token(get_config("coder_v2_lite")) == 576
  lite = get_config("coder_v2_lite")
  assert cache_bytes_per_token(lite, jnp.bfloat16) == 576 * 27 * 2
  model = init_model(TINY, seed=0)
  _, cache = prefill(model, jnp.ones((2, 8), jnp.int32), jnp.array([8, 5]), 20)
  per_token = (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * TINY.num_hidden_layers * 4
  assert cache.nbytes() == 2 * 20 * per_token == 2 * 20 * cache_bytes_per_token(TINY, "float32")
  assert sorted({a.shape[-1] for a in jax.tree.leaves(cache)}) == [
      TINY.qk_rope_head_dim, TINY.kv_lora_rank]


def _np_filter(logits, top_k, top_p):
  out = np.full_like(logits, -np.inf)
  for b, row in enumerate(logits):
    order = np.argsort(-row, kind="stable")
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    keep = []
    mass = 0.0
    for r, idx in enumerate(order):
      if (top_k and r >= top_k) or mass >= top_p:
        break
      keep.append(idx)
      mass += p[r]
    out[b, keep] = row[keep]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.3), (1, 1.0)])
def test_filters_match_numpy(top_k, top_p):
  logits = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32) * 2
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(_np_filter(logits, top_k, top_p)))
  np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_first_max_is_numpys_argmax_with_ties_and_infinities():
  rng = np.random.default_rng(9)
  x = rng.integers(-3, 4, size=(64, 37)).astype(np.float32)     # many ties per row
  x[::5] = -np.inf
  x[::5, ::3] = rng.normal(size=x[::5, ::3].shape)
  x[1, :] = -np.inf                                               # a row of -inf only
  x[2, 7] = np.inf
  np.testing.assert_array_equal(np.asarray(first_max(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_sampling_rules():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(6, 40)), jnp.float32)
  key = jax.random.key(0)
  greedy = np.asarray(jnp.argmax(logits, -1))
  np.testing.assert_array_equal(sample(logits, key, temperature=0.0, top_k=0, top_p=1.0), greedy)
  np.testing.assert_array_equal(sample(logits, key, temperature=1.5, top_k=1, top_p=1.0), greedy)
  a = sample(logits, key, temperature=1.0, top_k=0, top_p=1.0)
  np.testing.assert_array_equal(a, sample(logits, key, temperature=1.0, top_k=0, top_p=1.0))
  # Draws follow softmax(logits / T): frequencies over many keys within sampling error.
  row = logits[:1]
  draws = jax.vmap(lambda k: sample(row, k, temperature=2.0, top_k=0, top_p=1.0)[0])(
      jax.random.split(key, 20000))
  freq = np.bincount(np.asarray(draws), minlength=40) / 20000
  np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(row[0] / 2.0)), atol=0.012)


def _model():
  return init_model(TINY, seed=2)


PROMPTS = [[1, 40, 41, 42], [1, 7, 8, 9, 10, 11, 12, 13, 14], [1, 99]]


def test_greedy_is_deterministic_and_rows_are_independent():
  model = _model()
  a = generate_ids(model, PROMPTS, max_new_tokens=10)
  b = generate_ids(model, PROMPTS, max_new_tokens=10)
  assert a == b and all(len(t) == 10 for t in a.tokens)
  assert a.finish_reason == ["length"] * 3
  for p, t in zip(PROMPTS, a.tokens):        # batched rows equal each row alone
    assert generate_ids(model, [p], max_new_tokens=10).tokens[0] == t
  unrolled = init_model(TINY.replace(scan_layers=False), seed=2)   # prefill without the scan
  assert generate_ids(unrolled, PROMPTS, max_new_tokens=10) == a
  # A wider prompt slot (GRPO pads every batch to one) changes nothing.
  assert generate_ids(model, PROMPTS, max_new_tokens=10, prompt_slot=23) == a


def test_seeded_sampling_is_reproducible():
  model = _model()
  kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
  a = generate_ids(model, PROMPTS, seed=5, **kw)
  assert a == generate_ids(model, PROMPTS, seed=5, **kw)
  assert a.tokens != generate_ids(model, PROMPTS, seed=6, **kw).tokens


def test_shared_prefill_groups_sample_what_separate_prefills_do():
  model = _model()
  prompts = [p for p in PROMPTS for _ in range(3)]
  kw = dict(max_new_tokens=8, temperature=1.0, seed=11)
  want = generate_ids(model, prompts, **kw)
  got = generate_ids(model, prompts, group_size=3, **kw)
  assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
  np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(want.logprobs),
                             rtol=1e-5, atol=1e-6)
  assert len(set(map(tuple, got.tokens[:3]))) > 1        # a group's samples differ
  with pytest.raises(ValueError, match="must come in runs of group_size identical prompts"):
    generate_ids(model, prompts, group_size=2, **kw)
  with pytest.raises(ValueError, match="must come in runs of group_size identical prompts"):
    generate_ids(model, PROMPTS, group_size=3, **kw)


def test_eos_and_stop_sequences_end_rows():
  model = _model()
  base = generate_ids(model, PROMPTS, max_new_tokens=10).tokens
  eos = base[0][3]            # row 0's 4th token becomes EOS: it stops there, EOS dropped
  out = generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=eos)
  first = base[0].index(eos)
  assert out.tokens[0] == base[0][:first] and out.finish_reason[0] == "eos"
  stop = base[1][2:4]         # row 1 stops right after this pair appears
  out = generate_ids(model, PROMPTS, max_new_tokens=10, stop_ids=[stop, [511, 510, 509]])
  row = base[1]
  end = next(i + 2 for i in range(len(row) - 1) if row[i:i + 2] == stop)
  assert out.tokens[1] == row[:end] and out.finish_reason[1] == "stop"


def test_finished_rows_stop_growing_their_attention_length(monkeypatch):
  """After a row ends (EOS), the loop's remaining steps attend for it over a fixed length (the
  decode kernels then skip its cache past that), while live rows keep growing; the tokens are
  those of the plain run."""
  from coder_jax.decode import attention as decode_attention
  seen = []

  def recording(q_latent, q_rope, latent, rope, lengths, sm_scale):
    jax.debug.callback(lambda l: seen.append(np.asarray(l).copy()), lengths)
    return decode_attention.IMPLS["reference"](q_latent, q_rope, latent, rope, lengths, sm_scale)

  monkeypatch.setitem(decode_attention.IMPLS, "recording", recording)
  model = _model()
  base = generate_ids(model, PROMPTS, max_new_tokens=10).tokens
  eos = base[0][3]
  first = base[0].index(eos)
  out = generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=eos, attention_impl="recording")
  assert out.tokens == generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=eos).tokens
  per_step = np.stack(seen[::model.cfg.num_hidden_layers])     # one call per layer per step
  assert len(per_step) == 10 and out.finish_reason[0] == "eos"
  row0 = per_step[:, 0]
  assert (np.diff(row0[:first + 1]) == 1).all() and (row0[first:] == row0[first]).all()
  live = [i for i, r in enumerate(out.finish_reason) if r == "length"]
  assert live and (np.diff(per_step[:, live], axis=0) == 1).all()


@pytest.mark.parametrize("impl", ["auto", "pallas_tpu"])
def test_sharded_generation_matches_one_device(impl):
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  from coder_jax.train.state import param_specs, to_shardings
  from flax import nnx
  model = _model()
  want = generate_ids(model, PROMPTS, max_new_tokens=6).tokens
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2), jax.devices()[:8])
  graphdef, state = nnx.split(model)
  params = jax.device_put(nnx.to_pure_dict(state), to_shardings(param_specs(state, mesh), mesh))
  sharded = nnx.merge(graphdef, params)
  got = generate_ids(sharded, PROMPTS, max_new_tokens=6, mesh=mesh, attention_impl=impl)
  assert got.tokens == want
  if impl == "auto":   # runs of 3 prompts padded to whole runs and whole shards (12 rows)
    grouped = [p for p in PROMPTS for _ in range(3)]
    got = generate_ids(sharded, grouped, max_new_tokens=6, mesh=mesh, group_size=3)
    assert got.tokens == [t for t in want for _ in range(3)]
    # 2 runs of 2 on 8 row shards: 8 rows, whose 4 runs do not divide over 8 devices, so every
    # row is prefilled (before, the prefill's 4 rows failed to split over the batch axes).
    assert sampler_rows(4, 2, 8) == (8, 1) and sampler_rows(12, 3, 8) == (24, 3)
    pair = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    got = generate_ids(sharded, pair, max_new_tokens=6, mesh=mesh, group_size=2)
    assert got.tokens == [want[0]] * 2 + [want[1]] * 2


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_decode_kernels_generate_like_the_reference(impl):
  """The Pallas decode kernels (interpreted on CPU) inside the generation loop."""
  model = _model()
  want = generate_ids(model, PROMPTS, max_new_tokens=5, attention_impl="reference").tokens
  assert generate_ids(model, PROMPTS, max_new_tokens=5, attention_impl=impl).tokens == want


@pytest.mark.parametrize("bad, msg", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(prompts=[[]]), "at least one token"),
    (dict(prompts=[[1, 600]]), "must be in \\[0, 512\\)"),
    (dict(max_new_tokens=4000), "exceeds max_position_embeddings 2048"),
    (dict(attention_impl="nope"), "unknown implementation 'nope'"),
    (dict(prompt_slot=1), "prompt_slot 1 is shorter than the longest prompt \\(2\\)"),
])
def test_bad_settings_raise_clear_errors(bad, msg):
  prompts = bad.pop("prompts", [[1, 2]])
  with pytest.raises(ValueError, match=msg):
    generate_ids(_model(), prompts, **bad)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from coder_jax.data.tokenizer import train_tokenizer
  texts = ["def add(a, b):\n    return a + b\n", "def fib(n):\n    if n < 2:\n        return n\n"
           "    return fib(n - 1) + fib(n - 2)\n", "class A:\n    pass\n"] * 20
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return train_tokenizer(texts, 300, str(path)), path


def test_text_generation_and_stop_strings(tokenizer):
  tok, _ = tokenizer
  model = init_model(get_config("tiny", dtype="float32", vocab_size=300), seed=0)
  prompts = ["def add(a, b):", "class A:"]
  out = generate(model, tok, prompts, max_new_tokens=12)
  assert isinstance(out, list) and len(out) == 2
  ids = generate_ids(model, [[1] + tok.encode(p, add_special_tokens=False).ids for p in prompts],
                     max_new_tokens=12, eos_id=2).tokens
  assert out == [tok.decode(t) for t in ids]
  assert generate(model, tok, prompts, max_new_tokens=12, batch_size=1) == out
  assert generate(model, tok, prompts[0], max_new_tokens=12) == out[0]
  stops = [s for s in (out[0][2:4], out[1][1:3]) if s]   # stop strings cut the text before them
  for got, full in zip(generate(model, tok, prompts, max_new_tokens=12, stop=stops), out):
    assert not any(s in got for s in stops) and full.startswith(got)
  assert cut_at_stop("x = 1\ndefine", ["\ndef ", "\nclass "]) == "x = 1\ndefine"
  assert cut_at_stop("x = 1\ndef y():", ["\ndef ", "\nclass "]) == "x = 1"


def test_command_line(tokenizer, tmp_path, capsys):
  from coder_jax import hf
  _, tok_path = tokenizer
  model = init_model(get_config("tiny", dtype="float32", vocab_size=300), seed=0)
  hf.save(model, str(tmp_path / "ck"))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  cmd = [sys.executable, "-m", "coder_jax.decode", "--checkpoint", str(tmp_path / "ck"),
         "--prompt", "def add(a, b):", "--max_new_tokens", "6", "--json"]
  r = subprocess.run(cmd + ["--tokenizer", str(tok_path)], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.loads(r.stdout.strip().splitlines()[-1])
  assert row["prompt"] == "def add(a, b):" and isinstance(row["completion"], str)
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and "has no tokenizer.json; pass --tokenizer" in r.stderr
  r = subprocess.run(cmd[:4] + ["/nonexistent", "--prompt", "x"], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 2 and "no such checkpoint directory" in r.stderr
  from coder_jax.decode.__main__ import run
  capsys.readouterr()
  assert run(cmd[3:5]) == 2
  assert "give at least one --prompt or --prompt_file" in capsys.readouterr().err
  assert run(cmd[3:5] + ["--prompt_file", str(tmp_path / "none.txt")]) == 2
  assert "none.txt: no such prompt file" in capsys.readouterr().err


def test_a_tokenizer_that_is_not_the_models_is_refused(tokenizer, tmp_path):
  """The checkpoint's own tokenizer is the default; another vocabulary, or one larger than the
  model's, is one clear error (the first unless --allow_tokenizer_mismatch)."""
  import shutil
  from coder_jax import hf
  from coder_jax.data.tokenizer import train_tokenizer
  from coder_jax.decode import load
  from coder_jax.decode.__main__ import run
  _, tok_path = tokenizer
  model = init_model(get_config("tiny", dtype="float32", vocab_size=300), seed=0)
  ck = tmp_path / "ck"
  hf.save(model, str(ck))
  shutil.copyfile(tok_path, ck / "tokenizer.json")
  other = tmp_path / "other.json"
  train_tokenizer(["x = [i * i for i in range(10)]\nprint(x)\n"] * 30, 280, str(other))
  big = tmp_path / "big.json"
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(300)]
  assert train_tokenizer([" ".join(words)] * 5, 600, str(big)).get_vocab_size() > 300
  assert load(str(ck))[1].get_vocab() == load(str(ck), tokenizer=str(tok_path))[1].get_vocab()
  with pytest.raises(ValueError, match=r"other.json is not the tokenizer this model was trained "
                                       r"with .*--allow_tokenizer_mismatch"):
    load(str(ck), tokenizer=str(other))
  _, tok = load(str(ck), tokenizer=str(other), allow_tokenizer_mismatch=True)
  assert tok.get_vocab_size() <= 300
  with pytest.raises(ValueError, match=r"big.json has \d+ tokens but the model's vocab_size is "
                                       r"300"):
    load(str(ck), tokenizer=str(big), allow_tokenizer_mismatch=True)
  assert run(["--checkpoint", str(ck), "--tokenizer", str(other), "--prompt", "x"]) == 2
  assert run(["--checkpoint", str(ck), "--tokenizer", str(tmp_path / "no.json"),
              "--prompt", "x"]) == 2
