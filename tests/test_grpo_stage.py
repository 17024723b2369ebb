"""The GRPO stage on a tiny policy: rollouts laid out so the first update's ratio is 1 and its KL
0 (the sampler's log-probabilities equal the training forward's), rewards that fail count as 0,
clear errors, and learning: the mean reward rises over a short run for 3 seeds."""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from coder_jax import problems as problem_set
from coder_jax.parallel.mesh import MeshConfig
from coder_jax.stages.grpo import ProblemPrompts, RewardConfig, grpo
from coder_jax.stages.pretrain import pretrain
from coder_jax.train.data import SyntheticData
from coder_jax.train.optim import OptimizerConfig
from run_metrics import read_metrics

VOCAB = 512


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  """A tiny policy MODEL_DIR (2 synthetic steps) with a tokenizer trained on the problems."""
  from coder_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("grpo_policy")
  items, _ = problem_set.load(split="train")
  texts = [p.prompt + p.canonical_solution for p in items] * 3
  tok = train_tokenizer(texts, 400)
  assert tok.get_vocab_size(with_added_tokens=True) <= VOCAB
  gin.clear_config()
  gin.bind_parameter("model_config.vocab_size", VOCAB)
  pretrain(model_dir=str(root / "policy"), train_steps=2, batch_size=8, seq_len=32,
           data=SyntheticData(), mesh_config=MeshConfig(), compute_dtype="float32",
           checkpoint_every=2, async_checkpoints=False,
           optimizer_config=OptimizerConfig(learning_rate=1e-3, warmup_steps=1))
  tok.save(str(root / "policy" / "tokenizer.json"))
  gin.clear_config()
  return str(root / "policy")


def reply_length(problems, replies):
  return [len(r) / 40.0 for r in replies]


def digits(problems, replies):
  """The share of characters that are digits: a reward a random tiny policy can learn."""
  return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in replies]


def broken(problems, replies):
  raise RuntimeError("this reward function always fails")


def _grpo(policy, model_dir, steps, **kw):
  gin.clear_config()
  gin.bind_parameter("model_config.vocab_size", VOCAB)
  kw.setdefault("reward", RewardConfig(rm_weight=0.0, functions=(reply_length,)))
  kw.setdefault("optimizer_config", OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                                    schedule="constant"))
  try:
    defaults = dict(prompts_per_step=4, group_size=4, init_from_checkpoint=policy,
                    max_new_tokens=12)
    return grpo(model_dir=str(model_dir), train_steps=steps,
                prompts=ProblemPrompts(tokenizer=os.path.join(policy, "tokenizer.json")),
                compute_dtype="float32", seq_len=160, async_checkpoints=False,
                mesh_config=MeshConfig(), **{**defaults, **kw})
  finally:
    gin.clear_config()


@pytest.mark.parametrize("max_new", [12, 13])   # rows of both parities (prompt slot + max_new - 1)
def test_first_update_has_ratio_one_and_zero_kl(policy, tmp_path, monkeypatch, max_new):
  """The old log-probabilities come from the sampler; the update recomputes them with the
  training forward: equal positions and values give ratio 1, and the policy is the reference.
  The reference forward needs no reward: the stage dispatches it first, so that it runs on the
  device while the host scores the replies, and reads it after them (masked)."""
  import coder_jax.stages.grpo as stage
  calls, made = [], stage._reference

  def recording(*a, **kw):
    fn = made(*a, **kw)

    def ref_logp(batch):
      calls.append("reference")
      out = fn(batch)
      calls.append(("ref_logp", out, batch["mask"]))
      return out
    return ref_logp

  def scored(problems, replies):
    calls.append("reward")
    return reply_length(problems, replies)

  monkeypatch.setattr(stage, "_reference", recording)
  res = _grpo(policy, tmp_path / "run", 2, beta=0.04, temperature=0.9, max_new_tokens=max_new,
              reward=RewardConfig(rm_weight=0.0, functions=(scored,)))
  assert [c for c in calls if isinstance(c, str)] == ["reference", "reward"] * 2
  _, out, mask = calls[1]
  assert not isinstance(out, np.ndarray)        # a device array, not waited for
  assert np.asarray(out)[mask > 0].max() < 0    # log-probabilities where the replies are
  m = read_metrics(tmp_path / "run")
  assert sorted(m) == [1, 2] and res["step"] == 2
  first = m[1]
  assert abs(first["ratio"] - 1.0) < 1e-4, first["ratio"]
  assert first["clip_fraction"] == 0.0 and abs(first["kl"]) < 1e-6
  for key in ("reward_mean", "reward_std", "response_len", "entropy", "samples_per_s",
              "time_sampling_s", "time_reward_s", "time_reference_s", "time_wait_update_s", "kl",
              "clip_fraction", "policy_loss"):
    assert key in first, key
  assert first["entropy"] > 0 and 0 < first["response_len"] <= max_new + 1
  assert m[2]["kl"] >= 0
  assert os.path.exists(tmp_path / "run" / "config.gin")
  assert os.path.exists(tmp_path / "run" / "tokenizer.json")


def test_updates_per_batch_reuse_one_sample(policy, tmp_path):
  _grpo(policy, tmp_path / "run", 2, updates_per_batch=2, beta=0.0)
  m = read_metrics(tmp_path / "run")
  # The second update trains on the same samples: the same rewards, a moved ratio.
  assert m[1]["reward_mean"] == m[2]["reward_mean"]
  assert m[1]["response_len"] == m[2]["response_len"]
  assert abs(m[2]["ratio"] - 1.0) > 1e-6
  # One batch of samples, so its replies are logged once, at the step that first trains on it.
  with open(tmp_path / "run" / "samples.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 1, 1, 1]


def test_samples_jsonl_logs_replies_and_their_rewards(policy, tmp_path):
  run = tmp_path / "run"
  reward = RewardConfig(rm_weight=0.0, execution_weight=1.0, timeout_s=2.0,
                        functions=(reply_length, digits), function_weights=(1.0, 0.5))

  def rows():
    with open(run / "samples.jsonl") as f:
      return [json.loads(line) for line in f]

  _grpo(policy, run, 2, reward=reward, log_samples=3, checkpoint_every=1)
  first = rows()
  assert [r["step"] for r in first] == [1, 1, 1, 2, 2, 2]
  for r in first:
    # Each part recomputed from the logged reply, and the reward is their weighted sum.
    assert r["reward_reply_length"] == pytest.approx(len(r["reply"]) / 40.0)
    assert r["reward_digits"] == pytest.approx(digits(None, [r["reply"]])[0])
    assert r["passed"] in (0.0, 1.0) and r["finish"] in ("eos", "length")
    want = r["passed"] + r["reward_reply_length"] + 0.5 * r["reward_digits"]
    assert r["reward"] == pytest.approx(want, abs=1e-5)
  # The first rows of a step are samples of one prompt (a group of 4).
  assert len({r["task_id"] for r in first[:3]}) == 1
  assert len({r["task_id"] for r in first[3:]}) == 1
  # A killed run's lines past its checkpoint (and a torn last line) are gone after a resume.
  with open(run / "samples.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "reply": "stale"}) + "\n" + '{"step": 3, "rep')
  _grpo(policy, run, 3, reward=reward, log_samples=3, checkpoint_every=1)
  again = rows()
  assert again[:6] == first and [r["step"] for r in again[6:]] == [3, 3, 3]
  assert all(r["reply"] != "stale" for r in again)
  _grpo(policy, tmp_path / "quiet", 1, log_samples=0)
  assert not os.path.exists(tmp_path / "quiet" / "samples.jsonl")


def test_the_reward_models_score_is_the_reward(policy, tmp_path):
  """rm_weight x the RM's score of (the problem's prompt, the reply's body), as the RM's own
  scorer gives it for the logged replies."""
  from coder_jax import reward as rm
  from coder_jax.reward.data import RewardData
  from coder_jax.stages.grpo import body_of
  from coder_jax.stages.reward_model import reward_model
  items, _ = problem_set.load(split="train")
  with open(tmp_path / "rm.jsonl", "w") as f:
    for p in items[:8]:
      for body, ok in ((p.canonical_solution, True), ("    pass\n", False)):
        f.write(json.dumps({"prompt": p.prompt, "response": body, "passed": ok}) + "\n")
  gin.clear_config()
  gin.bind_parameter("model_config.vocab_size", VOCAB)
  try:
    reward_model(model_dir=str(tmp_path / "rm"), train_steps=2, batch_size=8, seq_len=192,
                 data=RewardData(path=str(tmp_path / "rm.jsonl"),
                                 tokenizer=os.path.join(policy, "tokenizer.json")),
                 compute_dtype="float32", async_checkpoints=False, checkpoint_every=2,
                 head_std=0.02, evaluate=False, init_from_checkpoint=policy,
                 mesh_config=MeshConfig())
  finally:
    gin.clear_config()
  _grpo(policy, tmp_path / "run", 1, log_samples=16,
        reward=RewardConfig(reward_model=str(tmp_path / "rm"), rm_weight=0.5))
  with open(tmp_path / "run" / "samples.jsonl") as f:
    rows = [json.loads(line) for line in f]
  by_id = {p.task_id: p for p in items}
  want = rm.load(str(tmp_path / "rm")).score([by_id[r["task_id"]].prompt for r in rows],
                                             [body_of(r["reply"]) for r in rows])
  got = np.array([r["rm_score"] for r in rows])
  assert len(rows) == 16 and np.ptp(want) > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose([r["reward"] for r in rows], 0.5 * want, rtol=1e-4, atol=1e-5)
  m = read_metrics(tmp_path / "run")[1]
  assert m["rm_score"] == pytest.approx(float(np.mean(want)), rel=1e-4, abs=1e-5)


def test_a_failing_reward_function_is_zero_with_its_reason(policy, tmp_path):
  _grpo(policy, tmp_path / "run", 1,
        reward=RewardConfig(rm_weight=0.0, functions=(broken, reply_length)))
  m = read_metrics(tmp_path / "run")[1]
  assert m["reward_reason_broken_error"] == 1.0 and m["reward_mean"] > 0
  assert m["reward_broken"] == 0.0 and m["reward_reply_length"] == m["reward_mean"]


@pytest.mark.parametrize("kw, message", [
    (dict(group_size=1), "group_size must be >= 2"),
    (dict(scale_rewards="batch"), r"scale_rewards must be one of \('group', 'none'\)"),
    (dict(log_samples=-1), "log_samples must be an int >= 0"),
    (dict(reward=RewardConfig()), "rm_weight is set but reward_model is not"),
    (dict(reward=RewardConfig(rm_weight=0.0)), "no reward"),
    (dict(init_from_checkpoint=None), "start from a policy"),
    (dict(max_new_tokens=200), "no problem's prompt fits"),
])
def test_bad_settings_are_one_clear_error(policy, tmp_path, kw, message):
  with pytest.raises(ValueError, match=message):
    _grpo(policy, tmp_path / "run", 1, **kw)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_tokenizer_larger_than_the_policy_is_refused(policy, tmp_path):
  from coder_jax.data.tokenizer import train_tokenizer
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 7)) for _ in range(600)]
  big = tmp_path / "big"
  shutil.copytree(policy, big)
  assert train_tokenizer([" ".join(words)] * 3, 1000, str(big / "tokenizer.json")).get_vocab_size() > VOCAB
  with pytest.raises(ValueError, match=r"has \d+ tokens but the policy's vocab_size is 512"):
    _grpo(str(big), tmp_path / "run", 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_raises_the_mean_reward(policy, tmp_path, seed):
  """Mean reward of the first 3 steps vs the last 3 of 30: clearly up (measured 0.015 -> 0.5),
  KL to the starting policy bounded (measured at most 1.6)."""
  _grpo(policy, tmp_path / "run", 30, seed=seed, beta=0.04, temperature=1.0,
        reward=RewardConfig(rm_weight=0.0, functions=(digits,)), prompts_per_step=4,
        group_size=8, optimizer_config=OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                                       schedule="constant"))
  m = read_metrics(tmp_path / "run")
  r = np.array([m[s]["reward_mean"] for s in sorted(m)])
  first, last = r[:3].mean(), r[-3:].mean()
  noise = np.array([m[s]["reward_std"] for s in sorted(m)][:3]).mean() / np.sqrt(32)
  assert last > first + 5 * noise and last > 3 * first, (seed, r.round(3).tolist())
  assert max(m[s]["kl"] for s in m) < 3.0
