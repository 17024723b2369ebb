"""The reward model: metrics against float64 references written here, objectives that add up
over micro-batches, learning a separable set, parity with transformers'
DeepseekV2ForSequenceClassification both ways (fp32, rel <= 1e-4), and the scorer on an export
and on a training directory."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer, DeepseekV2ForSequenceClassification

from coder_jax import hf, reward
from coder_jax.data.tokenizer import train_tokenizer
from coder_jax.hf import seq_cls
from coder_jax.hf.errors import CheckpointError
from coder_jax.model.config import ConfigError, ModelConfig
from coder_jax.model.decoder import DeepseekV2
from coder_jax.model.reward import RewardModel, params_from_policy
from coder_jax.parallel.mesh import MeshConfig, make_mesh
from coder_jax.train import state as train_state
from coder_jax.train.checkpoint import Checkpointer
from coder_jax.train.reward_losses import (expected_calibration_error, pairwise_metrics,
                                           pairwise_objective, pointwise_objective,
                                           reward_metrics, roc_auc)
from coder_jax.train.step import make_step
from hf_oracle import BASE, random_hf_model, rel_err

TOL = 1e-4
PAD = 0
SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                    rope_scaling=None, max_position_embeddings=64, bos_token_id=1,
                    eos_token_id=2)


# --- Metrics against float64 references.


def _auc_by_pairs(s, y):
  """The definition: over every (positive, negative) pair, 1 if the positive scores higher,
  1/2 on a tie."""
  pos, neg = s[y == 1], s[y == 0]
  return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def _ece_by_loop(s, y, bins=10):
  p = 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64)))
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    inside = [(pi, yi) for pi, yi in zip(p, y) if lo <= pi < hi or (b == bins - 1 and pi == 1.0)]
    if inside:
      total += len(inside) * abs(np.mean([v for _, v in inside]) - np.mean([q for q, _ in inside]))
  return total / len(p)


def _logit(p):
  return np.log(p) - np.log1p(-p)


def test_auc_by_hand_and_with_ties():
  # Positives score 1 and 3, negatives 1 and 2: pairs give 0.5 (tie), 0, 1, 1.
  assert roc_auc([1.0, 1.0, 2.0, 3.0], [0, 1, 0, 1]) == pytest.approx(2.5 / 4)
  assert roc_auc([0.0, 0.0, 0.0], [1, 0, 1]) == pytest.approx(0.5)   # all tied
  assert roc_auc([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0
  assert roc_auc([1.0, 2.0], [0, 0]) != roc_auc([1.0, 2.0], [0, 0])   # nan: one class only
  rng = np.random.default_rng(0)
  for _ in range(20):
    s = rng.integers(0, 6, 40).astype(np.float64)   # many ties
    y = rng.integers(0, 2, 40)
    assert roc_auc(s, y) == pytest.approx(_auc_by_pairs(s, y), abs=1e-12)


def test_ece_by_hand_and_against_a_loop():
  p = np.array([0.05, 0.15, 0.15, 0.95])
  # Bin 0: |0 - 0.05|; bin 1: 2 * |0.5 - 0.15|; bin 9: |1 - 0.95|; over 4 examples.
  assert expected_calibration_error(_logit(p), [0, 1, 0, 1]) == pytest.approx(0.2)
  # σ(50) rounds to 1.0, which belongs to the last bin.
  assert expected_calibration_error([50.0], [1]) == pytest.approx(0.0, abs=1e-12)
  rng = np.random.default_rng(1)
  for _ in range(10):
    s = rng.normal(0, 3, 60)
    y = rng.integers(0, 2, 60)
    assert expected_calibration_error(s, y) == pytest.approx(_ece_by_loop(s, y), abs=1e-12)


def test_reward_and_pairwise_metrics():
  m = reward_metrics([2.0, -1.0, 0.5, -3.0], [1, 0, 0, 0])
  assert m["accuracy"] == 0.75 and m["auc"] == 1.0 and m["positive_rate"] == 0.25
  assert m["examples"] == 4
  assert m["ece"] == pytest.approx(_ece_by_loop([2.0, -1.0, 0.5, -3.0], [1, 0, 0, 0]))
  p = pairwise_metrics([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
  assert p["accuracy"] == pytest.approx(0.5) and p["margin"] == pytest.approx(0.0)


# --- Objectives: float64 references and additive micro-batches.


class _TableModel:
  """Scores a row by a table lookup of its first token (no MoE, so no balance terms)."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def __call__(self, inputs, segment_ids, positions, return_aux=False):
    return self.table[inputs[:, 0]], {"router": []}


def _rows(rng, n, t=6, vocab=16):
  ids = rng.integers(1, vocab, (n, t)).astype(np.int32)
  seg = np.ones((n, t), np.int32)
  return ids, seg, np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy()


def _micro(batch, a):
  """The step's split: row r goes to micro-batch r % a."""
  return [{k: v[i::a] for k, v in batch.items()} for i in range(a)]


def test_pointwise_loss_is_weighted_bce_and_adds_over_micro_batches():
  rng = np.random.default_rng(2)
  table = rng.normal(0, 4, 16)
  ids, seg, pos = _rows(rng, 8)
  y = rng.uniform(0, 1, 8).astype(np.float32)   # soft labels too
  w = np.array([1, 1, 0, 1, 2, 1, 0, 1], np.float32)
  batch = dict(inputs=ids, segment_ids=seg, positions=pos, labels=y, row_weights=w)
  obj = pointwise_objective(SMALL)
  s = table[ids[:, 0]].astype(np.float64)
  p = 1 / (1 + np.exp(-s))
  want = np.sum(w * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / w.sum()
  norms = obj.norms(batch)
  loss, m = obj.loss_fn(_TableModel(table), batch, norms)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["accuracy"]) == pytest.approx(np.sum(w * ((s > 0) == (y > 0.5))) / w.sum())
  parts = [obj.loss_fn(_TableModel(table), mb, norms) for mb in _micro(batch, 4)]
  assert float(sum(l for l, _ in parts)) == pytest.approx(float(loss), rel=1e-6)
  for k in ("reward_loss", "accuracy", "score_mean", "label_mean"):
    assert float(sum(pm[k] for _, pm in parts)) == pytest.approx(float(m[k]), rel=1e-6, abs=1e-7)


def test_pairwise_loss_is_bradley_terry_and_adds_over_micro_batches():
  rng = np.random.default_rng(3)
  table = rng.normal(0, 3, 16)
  (ci, cs, cp), (ri, rs, rp) = _rows(rng, 6), _rows(rng, 6)
  w = np.array([1, 0, 1, 1, 1, 0.5], np.float32)
  batch = dict(chosen_inputs=ci, chosen_segment_ids=cs, chosen_positions=cp,
               rejected_inputs=ri, rejected_segment_ids=rs, rejected_positions=rp, row_weights=w)
  obj = pairwise_objective(SMALL)
  d = table[ci[:, 0]].astype(np.float64) - table[ri[:, 0]]
  want = np.sum(w * -np.log(1 / (1 + np.exp(-d)))) / w.sum()
  norms = obj.norms(batch)
  loss, m = obj.loss_fn(_TableModel(table), batch, norms)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m["margin"]) == pytest.approx(np.sum(w * d) / w.sum(), rel=1e-5)
  parts = [obj.loss_fn(_TableModel(table), mb, norms) for mb in _micro(batch, 3)]
  assert float(sum(l for l, _ in parts)) == pytest.approx(float(loss), rel=1e-6)
  assert float(sum(pm["accuracy"] for _, pm in parts)) == pytest.approx(float(m["accuracy"]))


def test_score_is_read_at_the_last_real_token():
  rm = RewardModel(SMALL, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(rm)
  score = jax.jit(lambda ids, seg: nnx.merge(graphdef, state)(ids, seg))
  ids = np.random.default_rng(4).integers(3, 64, (3, 9)).astype(np.int32)
  seg = np.zeros((3, 9), np.int32)
  for r, n in enumerate((9, 4, 1)):
    seg[r, :n] = 1
  got = np.asarray(score(ids, seg))
  for r, n in enumerate((9, 4, 1)):
    alone = np.asarray(score(ids[r:r + 1, :n], np.ones((1, n), np.int32)))[0]   # unpadded
    assert got[r] == pytest.approx(alone, rel=1e-5, abs=1e-6)
  assert "lm_head" not in nnx.to_pure_dict(nnx.state(rm, nnx.Param))["model"]


# --- The shared step trains it sharded, from a policy.


def test_state_from_policy_is_sharded_and_trains_with_accumulation():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
  policy = DeepseekV2(SMALL, rngs=nnx.Rngs(params=1))
  pp = nnx.to_pure_dict(nnx.state(policy, nnx.Param))
  params = params_from_policy(pp, SMALL, seed=0)
  assert not np.any(np.asarray(params["score"]))   # the default head starts every score at 0
  drawn = params_from_policy(pp, SMALL, seed=5, head_std=0.02)["score"]
  assert float(jnp.std(drawn)) == pytest.approx(0.02, rel=0.5)
  with pytest.raises(ValueError, match="embed_tokens"):   # a policy of another vocabulary
    params_from_policy(pp, SMALL.replace(vocab_size=128))
  opt = optax.adam(1e-3)
  graphdef, state, shardings = train_state.init_state(SMALL, opt, mesh, params=params,
                                                      model_cls=RewardModel)
  # The head's hidden dim is sharded as the embedding's.
  embed_spec = shardings["params"]["model"]["embed_tokens"].spec
  assert shardings["params"]["score"].spec[0] == embed_spec[1] and embed_spec[1] is not None
  np.testing.assert_array_equal(np.asarray(state["params"]["model"]["embed_tokens"]),
                                np.asarray(pp["embed_tokens"]))
  rng = np.random.default_rng(5)
  (ci, cs, cp), (ri, rs, rp) = _rows(rng, 8, t=8, vocab=64), _rows(rng, 8, t=8, vocab=64)
  cs[:, 5:] = 0   # right padding on the chosen side
  batch = dict(chosen_inputs=ci, chosen_segment_ids=cs, chosen_positions=cp,
               rejected_inputs=ri, rejected_segment_ids=rs, rejected_positions=rp,
               row_weights=np.ones(8, np.float32))
  out = {}
  with jax.set_mesh(mesh):
    for a in (1, 2):
      step = jax.jit(make_step(graphdef, opt, lambda _: 1e-3, pairwise_objective(SMALL),
                               grad_accum_steps=a), in_shardings=(shardings, None))
      _, m = step(state, batch)
      out[a] = (float(m["reward_loss"]), float(m["loss"]), float(m["grad_norm"]))
  assert out[1][0] == pytest.approx(np.log(2.0), rel=1e-6)   # zero head: every margin is 0
  assert out[1][1] > out[1][0]                                # plus the balance loss
  np.testing.assert_allclose(out[2], out[1], rtol=1e-5)


# --- It learns.


def _marker_set(rng, n, t=16, marker=3):
  """Rows of random tokens; label 1 where `marker` appears somewhere (BOS first, right padded)."""
  lens = rng.integers(6, t + 1, n)
  y = rng.integers(0, 2, n).astype(np.float32)
  ids, seg = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
  for i in range(n):
    x = rng.integers(marker + 1, SMALL.vocab_size, lens[i])
    x[0] = 1
    if y[i]:
      x[rng.integers(1, lens[i])] = marker
    ids[i, :lens[i]], seg[i, :lens[i]] = x, 1
  pos = np.where(seg > 0, np.arange(t), 0).astype(np.int32)
  return dict(inputs=ids, segment_ids=seg, positions=pos, labels=y,
              row_weights=np.ones(n, np.float32))


def test_pointwise_rm_learns_a_separable_set():
  rng = np.random.default_rng(0)
  train, held_out = _marker_set(rng, 512), _marker_set(rng, 256)
  graphdef, state = nnx.split(RewardModel(SMALL, rngs=nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(state)
  obj, opt = pointwise_objective(SMALL), optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(p, o, b):
    norms = obj.norms(b)
    (loss, _), g = jax.value_and_grad(lambda q: obj.loss_fn(nnx.merge(graphdef, q), b, norms),
                                      has_aux=True)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  score = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["inputs"], b["segment_ids"],
                                                      b["positions"]))
  before = reward_metrics(np.asarray(score(params, held_out)), held_out["labels"])
  for _ in range(100):
    idx = rng.choice(len(train["labels"]), 32, replace=False)
    params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in train.items()})
  after = reward_metrics(np.asarray(score(params, held_out)), held_out["labels"])
  assert before["auc"] < 0.75 and after["auc"] > 0.9, (before, after)
  assert after["accuracy"] > 0.8 and after["ece"] < 0.2, after


# --- transformers' DeepseekV2ForSequenceClassification, both ways.

CASES = {"qlora_null_greedy": dict(),
         "qlora_group_limited_no_shared": dict(q_lora_rank=24, n_shared_experts=0, n_group=4,
                                               topk_method="group_limited_greedy", topk_group=2)}


def _random_hf_rm(seed, **overrides):
  return random_hf_model(seed, DeepseekV2ForSequenceClassification,
                         **{**overrides, "num_labels": 1, "pad_token_id": PAD})


def _right_padded(seed, lengths, t=40, vocab=300):
  ids = np.random.default_rng(seed).integers(1, vocab, (len(lengths), t))   # never PAD
  mask = (np.arange(t) < np.asarray(lengths)[:, None]).astype(np.int64)
  return np.where(mask > 0, ids, PAD), mask


def _hf_scores(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  return out.logits.float().numpy()[:, 0]


def _leaves(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_both_directions(name, tmp_path):
  ref = _random_hf_rm(len(name), **CASES[name])
  ref.save_pretrained(tmp_path / "hf")
  ids, mask = _right_padded(len(name), [40, 23, 7, 1])
  want = _hf_scores(ref, ids, mask)

  ours = seq_cls.load(str(tmp_path / "hf"))
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  assert got.shape == (4,) and rel_err(got, want) <= TOL

  seq_cls.save(ours, str(tmp_path / "back"), pad_token_id=PAD)
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert config["architectures"] == ["DeepseekV2ForSequenceClassification"]
  assert config["pad_token_id"] == PAD
  again = DeepseekV2ForSequenceClassification.from_pretrained(tmp_path / "back").eval()
  assert again.config.num_labels == 1
  assert tuple(again.score.weight.shape) == (1, BASE["hidden_size"])
  assert rel_err(_hf_scores(again, ids, mask), got) <= TOL

  for a, b in zip(_leaves(ours), _leaves(seq_cls.load(str(tmp_path / "back")))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_export_refuses_a_pad_id_that_is_eos_or_missing(tmp_path):
  rm = RewardModel(SMALL, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="pad_token_id: a reward model export needs one"):
    seq_cls.save(rm, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="is the EOS id"):
    seq_cls.save(rm, str(tmp_path / "b"), pad_token_id=SMALL.eos_token_id)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_causal_lm_export_is_refused_naming_the_head(tmp_path):
  cfg = SMALL.replace(vocab_size=300)
  hf.save(DeepseekV2(cfg, rngs=nnx.Rngs(params=0)), str(tmp_path / "lm"))
  with pytest.raises(CheckpointError) as e:
    seq_cls.load(str(tmp_path / "lm"))
  assert "no reward head" in str(e.value) and "'score.weight'" in str(e.value)
  assert "DeepseekV2ForCausalLM" in str(e.value)


# --- The scorer, on an export with a trained tokenizer and on a training directory.

TEXTS = ["def add(a, b):\n    return a + b\n", "Write a function that adds two numbers.",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "print('hello world')", "User: Assistant: explain the code below"] * 20
PROMPTS = ["Write a function that adds two numbers.", "Print hello.", "Fibonacci?"]
RESPONSES = ["def add(a, b):\n    return a + b", "print('hello world')",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"]


@pytest.fixture(scope="module")
def rm_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm")
  tok = str(root / "tokenizer.json")
  train_tokenizer(TEXTS, vocab_size=300, out_path=tok)
  rm = RewardModel(SMALL.replace(vocab_size=300), rngs=nnx.Rngs(params=3))
  out = seq_cls.save(rm, str(root / "hf"), tokenizer=tok)
  return rm, out, tok


def test_scorer_on_an_export_matches_transformers(rm_export):
  _, out, _ = rm_export
  scorer = reward.load(out, batch_size=2)   # two batches, the last one padded
  got = scorer.score(PROMPTS, RESPONSES)
  tok = AutoTokenizer.from_pretrained(out)
  rows = []
  for p, r in zip(PROMPTS, RESPONSES):
    enc = tok.apply_chat_template([{"role": "user", "content": p},
                                   {"role": "assistant", "content": r}], tokenize=True)
    rows.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
  assert rows == scorer.encode(PROMPTS, RESPONSES)   # the exported template, rendered by HF
  t = max(map(len, rows))
  ids = np.full((len(rows), t), tok.pad_token_id)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  model = DeepseekV2ForSequenceClassification.from_pretrained(out).eval()
  assert got.dtype == np.float32 and rel_err(got, _hf_scores(model, ids, mask)) <= TOL


def test_scorer_on_a_training_directory(rm_export, tmp_path):
  rm, out, tok = rm_export
  params = nnx.to_pure_dict(nnx.state(rm, nnx.Param))
  ck = Checkpointer(str(tmp_path / "run"), every=1, async_save=False)
  ck.save(7, {"params": params, "step": jnp.int32(7)}, {"batches": 7}, rm.cfg, force=True)
  ck.close()
  shutil.copy(tok, tmp_path / "run" / "tokenizer.json")
  got = reward.load(str(tmp_path / "run")).score(PROMPTS, RESPONSES)
  np.testing.assert_allclose(got, reward.load(out).score(PROMPTS, RESPONSES), rtol=1e-5)

  lm = DeepseekV2(rm.cfg, rngs=nnx.Rngs(params=0))
  ck = Checkpointer(str(tmp_path / "lm_run"), every=1, async_save=False)
  ck.save(1, {"params": nnx.to_pure_dict(nnx.state(lm, nnx.Param))}, {"batches": 1}, lm.cfg,
          force=True)
  ck.close()
  with pytest.raises(ConfigError, match="no reward head"):
    reward.load(str(tmp_path / "lm_run"))
