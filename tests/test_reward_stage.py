"""The reward_model stage, its data and the builder CLI: rendering equal to the scorer's and the
SFT data's, the held-out split by prompt, malformed records counted, resume; the stage end to end
on a tiny policy (held-out AUC > 0.9 on a separable set), its export scored by transformers; the
builder labelling with the sandbox; every bad input one line with exit status 2."""

import collections
import json
import re
import shutil

import gin
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV2ForSequenceClassification

from coder_jax import main as entry
from coder_jax.hf import __main__ as hf_cli
from coder_jax import reward
from coder_jax.data.chat import ChatData
from coder_jax.data.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer
from coder_jax.model.config import ConfigError, get_config
from coder_jax.model.reward import RewardModel
from coder_jax.parallel.mesh import MeshConfig
from coder_jax.reward import __main__ as cli
from coder_jax.reward.data import (RewardData, generation_prompt, prompt_is_heldout,
                                   reply_content)
from coder_jax.stages.pretrain import pretrain
from coder_jax.stages.reward_model import reward_model
from coder_jax.train.data import SyntheticData
from coder_jax.train.optim import OptimizerConfig
from hf_oracle import rel_err
from run_metrics import read_metrics

SEQ = 64
NAMES = ["add", "sub", "scale", "clamp", "head", "tail", "count", "pick", "merge", "split"]


def _records(n_prompts=40, per_prompt=4, seed=0):
  """A separable set: a passing response returns an expression, a failing one ends in `pass`."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n_prompts):
    name = f"{NAMES[i % len(NAMES)]}_{i}"
    prompt = f'def {name}(x: int) -> int:\n    """Return x and {i}."""\n'
    for k in range(per_prompt):
      v = int(rng.integers(0, 9))
      if k % 2 == 0:
        out.append({"prompt": prompt, "response": f"    return x + {v}\n", "passed": True})
      else:
        out.append({"prompt": prompt, "response": f"    y = x * {v}\n    pass\n",
                    "passed": 0})
  return out


def _write(path, records):
  """Records as JSON lines; a str or bytes item is written as it is."""
  as_bytes = lambda r: r if isinstance(r, bytes) else (
      r if isinstance(r, str) else json.dumps(r) + "\n").encode("utf-8")
  path.write_bytes(b"".join(as_bytes(r) for r in records))
  return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A tokenizer trained on the records' texts, and a tiny policy (2 pretraining steps) whose
  MODEL_DIR holds it."""
  root = tmp_path_factory.mktemp("rm_stage")
  recs = _records()
  texts = [r["prompt"] + r["response"] for r in recs] + ["User: Assistant: \n\n"] * 8
  tok = str(root / "tokenizer.json")
  train_tokenizer(texts, 400, tok)
  gin.clear_config()
  pretrain(model_dir=str(root / "policy"), train_steps=2, batch_size=8, seq_len=32,
           data=SyntheticData(), mesh_config=MeshConfig(), compute_dtype="float32",
           checkpoint_every=2, async_checkpoints=False)
  shutil.copy(tok, root / "policy" / "tokenizer.json")
  return dict(root=root, tok=tok, policy=str(root / "policy"),
              data=_write(root / "rm.jsonl", recs), records=recs)


def _open(path, tok, *, batch_rows=4, shard=0, num_shards=1, start_batch=0, **kw):
  return RewardData(path=path, tokenizer=tok, **kw).open(
      model_vocab=512, batch_rows=batch_rows, seq_len=SEQ, shard=shard, num_shards=num_shards,
      start_batch=start_batch)


# --- The data.


def test_rows_render_as_the_scorer_and_the_sft_data(env, tmp_path):
  recs = env["records"][:3]
  path = _write(tmp_path / "three.jsonl", recs)
  ex = RewardData(path=path, tokenizer=env["tok"], heldout_fraction=0.0).load(SEQ)
  batch = ex.rows([0, 1, 2])
  scorer = reward.Scorer(RewardModel(get_config("tiny"), rngs=nnx.Rngs(0)),
                         load_tokenizer(env["tok"]))
  want = scorer.encode([r["prompt"] for r in recs], [r["response"] for r in recs])
  tok = load_tokenizer(env["tok"])
  chat = _write(tmp_path / "chat.jsonl", [{"messages": [
      {"role": "user", "content": r["prompt"]},
      {"role": "assistant", "content": r["response"]}]} for r in recs])
  sft = ChatData(path=chat, tokenizer=env["tok"], shuffle=False).load(SEQ)
  for i, r in enumerate(recs):
    n = int(batch["segment_ids"][i].sum())
    ids = batch["inputs"][i, :n].tolist()
    assert ids == want[i]
    assert ids == sft.example(i)[0].tolist()   # the SFT data's own tokenization
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == f"{BOS}User: {r['prompt']}\n\nAssistant: {r['response']}{EOS}"
    assert not batch["inputs"][i, n:].any() and not batch["segment_ids"][i, n:].any()
    assert batch["positions"][i, :n].tolist() == list(range(n))
    assert batch["labels"][i] == float(r["passed"]) and batch["row_weights"][i] == 1.0
  # The builder's prompt and reply convention is the template's.
  assert generation_prompt("q") == "User: q\n\nAssistant:"
  assert reply_content(" body") == "body" and reply_content("body") == "body"


def test_heldout_split_is_by_prompt_and_independent_of_order(env, tmp_path):
  recs = env["records"]
  ex = RewardData(path=env["data"], tokenizer=env["tok"], heldout_fraction=0.25).load(SEQ)
  by_prompt = collections.defaultdict(set)
  for r, h in zip(recs, ex.heldout):
    by_prompt[r["prompt"]].add(bool(h))
  assert all(len(sides) == 1 for sides in by_prompt.values())   # a prompt is on one side
  held = {p for p, s in by_prompt.items() if True in s}
  assert 0 < len(held) < len(by_prompt)
  assert held == {p for p in by_prompt if prompt_is_heldout(p, 0.25)}
  shuffled = [recs[i] for i in np.random.default_rng(1).permutation(len(recs))]
  ex2 = RewardData(path=_write(tmp_path / "s.jsonl", shuffled), tokenizer=env["tok"],
                   heldout_fraction=0.25).load(SEQ)
  assert {r["prompt"] for r, h in zip(shuffled, ex2.heldout) if h} == held
  batch = ex.heldout_batch()
  assert len(batch["labels"]) == int(ex.heldout.sum())
  # Training batches never hold a held-out example.
  stream = ex.open(model_vocab=512, batch_rows=8, seq_len=SEQ, shard=0, num_shards=1,
                   start_batch=0)
  held_rows = {tuple(r) for r in batch["inputs"]}
  for _ in range(10):
    assert not held_rows & {tuple(r) for r in next(stream)["inputs"]}


def test_malformed_records_are_skipped_and_counted(env, tmp_path, capsys):
  good = env["records"][:4]
  bad = ['{"prompt": "p", "response": "r", "passed": 1',               # bad_json
         b'{"prompt": "\xff", "response": "r", "passed": 1}',            # invalid_utf8
         '[1, 2]',                                                       # not_an_object
         '{"prompt": "p", "chosen": "a", "rejected": "b"}',              # other_objective
         '{"prompt": "p", "passed": true}',                              # missing_field
         '{"prompt": "p", "response": "r"}',                             # missing_field
         '{"prompt": 3, "response": "r", "passed": true}',               # non_string_text
         '{"prompt": "p", "response": "r", "passed": "yes"}',            # bad_label
         '{"prompt": "p", "response": "r", "passed": 2}',                # bad_label
         '{"prompt": "p", "response": "r", "passed": 1.0}',              # bad_label
         '{"prompt": "p", "response": "\\ud800", "passed": true}',       # invalid_utf8
         json.dumps({"prompt": "p", "response": "x " * 200, "passed": True})]   # too_long
  path = _write(tmp_path / "mixed.jsonl", [*good, *[b + (b"\n" if isinstance(b, bytes) else "\n")
                                                      for b in bad], "\n"])
  ex = RewardData(path=path, tokenizer=env["tok"], heldout_fraction=0.0).load(SEQ)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert len(ex) == 4 and ex.records == 16
  assert ex.skipped == {"bad_json": 1, "invalid_utf8": 2, "not_an_object": 1,
                        "other_objective": 1, "missing_field": 2, "non_string_text": 1,
                        "bad_label": 3, "too_long": 1}
  assert "16 records -> 4 examples" in line and "skipped 12 (bad_label 3," in line
  pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"},
                                             {"prompt": "p", "response": "r", "passed": True}])
  with pytest.raises(ValueError, match=r"no usable records .*identical_pair 1, "
                                       r"other_objective 1"):
    RewardData(path=pairs, tokenizer=env["tok"], objective="pairwise").load(SEQ)
  with pytest.raises(ValueError, match="holds no records"):
    RewardData(path=_write(tmp_path / "empty.jsonl", ["\n"]), tokenizer=env["tok"]).load(SEQ)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_stream_resumes_reshuffles_and_splits_over_hosts(env):
  stream = _open(env["data"], env["tok"], batch_rows=6, heldout_fraction=0.0)
  n = len(stream.train)
  batches = [next(stream) for _ in range(2 * n // 6 + 2)]
  assert stream.state() == {"batches": len(batches)}
  resumed = _open(env["data"], env["tok"], batch_rows=6, heldout_fraction=0.0, start_batch=5)
  assert all(_equal(next(resumed), b) for b in batches[5:])
  flat = lambda k: np.concatenate([b[k] for b in batches])
  rows = [tuple(r) for r in flat("inputs")]
  epoch0, epoch1 = rows[:n], rows[n:2 * n]
  every = sorted(tuple(r) for r in stream.examples.rows(stream.train.tolist())["inputs"])
  assert sorted(epoch0) == sorted(epoch1) == every and epoch0 != epoch1   # reshuffled
  # Two hosts of 3 rows read the single host's 6.
  hosts = [_open(env["data"], env["tok"], batch_rows=3, shard=s, num_shards=2,
                 heldout_fraction=0.0) for s in (0, 1)]
  for b in batches[:3]:
    parts = [next(h) for h in hosts]
    assert _equal({k: np.concatenate([p[k] for p in parts]) for k in b}, b)


def test_pairwise_rows(env, tmp_path):
  recs = env["records"]
  pairs = [{"prompt": recs[i]["prompt"], "chosen": recs[i]["response"],
            "rejected": recs[i + 1]["response"]} for i in range(0, 20, 2)]
  stream = _open(_write(tmp_path / "p.jsonl", pairs), env["tok"], objective="pairwise",
                 heldout_fraction=0.0, shuffle=False)
  b = next(stream)
  assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected")
                    for k in ("inputs", "segment_ids", "positions")} | {"row_weights"}
  tok = load_tokenizer(env["tok"])
  for i in range(4):
    for side in ("chosen", "rejected"):
      n = int(b[f"{side}_segment_ids"][i].sum())
      text = tok.decode(b[f"{side}_inputs"][i, :n].tolist(), skip_special_tokens=False)
      assert text.endswith(f"Assistant: {pairs[i][side]}{EOS}")


# --- The stage, end to end, and its export.


def _train(env, model_dir, steps, **kw):
  gin.clear_config()
  data = kw.pop("data", RewardData(path=env["data"], tokenizer=env["tok"],
                                   heldout_fraction=0.25))
  return reward_model(model_dir=str(model_dir), train_steps=steps, seq_len=SEQ, data=data,
                      batch_size=kw.pop("batch_size", 16), compute_dtype="float32", async_checkpoints=False,
                      optimizer_config=OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
                      **{"init_from_checkpoint": env["policy"], **kw})


@pytest.fixture(scope="module")
def trained(env):
  out = _train(env, env["root"] / "rm", 40, checkpoint_every=20)
  return env["root"] / "rm", out


def test_stage_learns_the_separable_set(trained):
  model_dir, out = trained
  assert out["reason"] == "done" and out["step"] == 40
  m = read_metrics(model_dir)
  assert set(m[1]) >= {"reward_loss", "accuracy", "score_mean", "label_mean"}
  assert m[1]["reward_loss"] == pytest.approx(np.log(2.0), rel=1e-4)   # the head starts at 0
  assert "eval_auc" in m[20] and "eval_auc" not in m[19]
  assert m[40]["eval_auc"] > 0.9 and m[40]["eval_accuracy"] > 0.8, m[40]
  assert m[40]["eval_examples"] > 0 and 0 <= m[40]["eval_ece"] < 0.3
  assert (model_dir / "tokenizer.json").exists() and (model_dir / "config.gin").exists()


def test_export_scores_equal_transformers(env, trained, tmp_path, capsys):
  model_dir, _ = trained
  out = str(tmp_path / "hf")
  assert cli.run(["export", "--train_dir", str(model_dir), "--out", out]) == 0
  recs = env["records"][:6]
  prompts, responses = [r["prompt"] for r in recs], [r["response"] for r in recs]
  ours = reward.load(out)
  got = ours.score(prompts, responses)
  np.testing.assert_allclose(got, reward.load(str(model_dir)).score(prompts, responses),
                             rtol=1e-4, atol=1e-5)
  rows = ours.encode(prompts, responses)
  t = max(map(len, rows))
  ids = np.full((len(rows), t), ours.pad_id)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  hf = DeepseekV2ForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  assert rel_err(got, want.float().numpy()[:, 0]) <= 1e-4
  # coder_jax.hf's export knows a reward_model run too, and writes the same weights.
  assert hf_cli.main(["export", "--train_dir", str(model_dir), "--out", str(tmp_path / "hf2")]) == 0
  config = json.loads((tmp_path / "hf2" / "config.json").read_text())
  assert config["architectures"] == ["DeepseekV2ForSequenceClassification"]
  np.testing.assert_array_equal(reward.load(str(tmp_path / "hf2")).score(prompts, responses), got)
  capsys.readouterr()
  assert cli.run(["score", "--model", out, "--prompt", prompts[0], "--response",
                  responses[0]]) == 0
  assert float(capsys.readouterr().out) == pytest.approx(float(got[0]), rel=1e-4)


def test_pairwise_stage_ranks_the_held_out_pairs(env, tmp_path):
  recs = env["records"]   # per prompt: pass, fail, pass, fail
  pairs = [{"prompt": recs[i]["prompt"], "chosen": recs[i]["response"],
            "rejected": recs[i + 1]["response"]} for i in range(0, len(recs), 2)]
  data = RewardData(path=_write(tmp_path / "pairs.jsonl", pairs), tokenizer=env["tok"],
                    objective="pairwise", heldout_fraction=0.25)
  _train(env, tmp_path / "pw", 20, data=data, batch_size=8, checkpoint_every=20)
  m = read_metrics(tmp_path / "pw")
  assert m[1]["reward_loss"] == pytest.approx(np.log(2.0), rel=1e-4)
  assert m[20]["eval_accuracy"] > 0.9 and m[20]["eval_auc"] > 0.9 and m[20]["eval_margin"] > 0


@pytest.mark.parametrize("source", ["train_dir", "hf_export"])
def test_a_reward_model_continues_with_its_head(env, trained, source, tmp_path):
  model_dir, _ = trained
  start = {"init_from_checkpoint": str(model_dir)}
  if source == "hf_export":
    assert cli.run(["export", "--train_dir", str(model_dir), "--out", str(tmp_path / "hf")]) == 0
    start = {"init_from_hf": str(tmp_path / "hf"), "init_from_checkpoint": None}
  _train(env, tmp_path / "again", 1, evaluate=False, **start)
  first = read_metrics(tmp_path / "again")[1]["reward_loss"]
  assert first < 0.5   # a fresh head would start at log 2 = 0.693


# --- The builder.


def _problems(tmp_path):
  """Two problems; the second one's canonical solution is wrong, which only the sandbox knows."""
  probs = [{"task_id": "t/0", "prompt": 'def inc(x: int) -> int:\n    """x + 1"""\n',
            "entry_point": "inc", "split": "train", "canonical_solution": "    return x + 1\n",
            "tests": "def check(candidate):\n    assert candidate(1) == 2\n"},
           {"task_id": "t/1", "prompt": 'def dec(x: int) -> int:\n    """x - 1"""\n',
            "entry_point": "dec", "split": "train", "canonical_solution": "    return x + 1\n",
            "tests": "def check(candidate):\n    assert candidate(1) == 0\n"}]
  return _write(tmp_path / "problems.jsonl", probs)


def test_builder_labels_with_the_sandbox(env, tmp_path, capsys):
  problems, out = _problems(tmp_path), str(tmp_path / "recs.jsonl")
  args = ["build", "--policy", env["policy"], "--problems", problems, "--samples", "2",
          "--max_new_tokens", "8", "--include_reference"]
  assert cli.run(args + ["--out", out]) == 0
  assert "wrote 8 pointwise records" in capsys.readouterr().out
  recs = [json.loads(l) for l in open(out)]
  assert [(r["task_id"], r["source"]) for r in recs] == [
      (t, s) for t in ("t/0", "t/1") for s in ("policy", "policy", "reference", "empty")]
  label = {(r["task_id"], r["source"]): r["passed"] for r in recs}
  assert label[("t/0", "reference")] is True and label[("t/1", "reference")] is False
  assert label[("t/0", "empty")] is False and label[("t/1", "empty")] is False
  assert recs[2]["response"] == "    return x + 1\n" and recs[3]["response"] == "    pass\n"
  ex = RewardData(path=out, tokenizer=env["tok"], heldout_fraction=0.0).load(256)
  assert len(ex) == 8 and set(ex.labels.tolist()) == {0.0, 1.0}
  assert cli.run(args + ["--out", out]) == 2   # an existing --out is kept
  assert "exists (pass --overwrite" in capsys.readouterr().err
  pairs = str(tmp_path / "pairs.jsonl")
  assert cli.run(args + ["--out", pairs, "--pairs"]) == 0
  got = [json.loads(l) for l in open(pairs)]
  assert got and {r["task_id"] for r in got} == {"t/0"}   # t/1 has nothing that passes
  assert all(r["chosen"] == "    return x + 1\n" and r["rejected"] != r["chosen"] for r in got)


# --- Bad input: one line, exit status 2.


def _one_line(capsys, pattern):
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.strip() and not l.startswith("WARNING:absl")]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert re.search(pattern, lines[0]), lines[0]


def test_cli_bad_input(env, trained, tmp_path, capsys):
  model_dir, _ = trained
  out = str(tmp_path / "x.jsonl")
  cases = [
      (["build", "--policy", str(tmp_path / "nope"), "--out", out, "--limit", "1"],
       "no such checkpoint directory"),
      (["build", "--policy", env["policy"], "--out", out, "--samples", "0"],
       "--samples: 0; give >= 1"),
      (["build", "--policy", env["policy"], "--out", out,
        "--problems", _write(tmp_path / "bad.jsonl", ["{}\n"])],
       r"no usable train problems .*missing_field"),
      (["build", "--policy", str(model_dir), "--out", str(tmp_path)], "is a directory"),
      (["export", "--train_dir", env["policy"], "--out", str(tmp_path / "hf")],
       "no reward head"),
      (["export", "--train_dir", str(model_dir), "--out", str(model_dir)], "exists"),
      (["score", "--model", str(model_dir), "--prompt", "a"], "in pairs"),
  ]
  for argv, pattern in cases:
    assert cli.run(argv) == 2, argv
    _one_line(capsys, pattern)
  with pytest.raises(ConfigError, match="no reward head"):
    reward.load(env["policy"])


def test_stage_bad_input(env, tmp_path, capsys):
  big = load_tokenizer(env["tok"])
  big.add_tokens([f"tok{i}" for i in range(600 - big.get_vocab_size(with_added_tokens=True))])
  big.save(str(tmp_path / "big.json"))
  all_bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "p"}\n'] * 3)
  base = ["--gin_file=gin_configs/models/tiny.gin", "--gin_file=gin_configs/runs/reward_model.gin",
          f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          f"--gin.SEQ_LEN={SEQ}", f"--gin.TOKENIZER='{env['tok']}'",
          f"--gin.reward_model.init_from_checkpoint='{env['policy']}'"]
  cases = [
      ([f"--gin.RM_DATA='{env['data']}'", f"--gin.TOKENIZER='{tmp_path / 'big.json'}'"],
       r"has 600 tokens but the model's vocab_size is 512"),   # not the policy's tokenizer
      ([f"--gin.RM_DATA='{_write(tmp_path / 'e.jsonl', [])}'"], "holds no records"),
      ([f"--gin.RM_DATA='{all_bad}'"], r"no usable records .*missing_field 3"),
      ([f"--gin.RM_DATA='{env['data']}'", "--gin.RewardData.heldout_fraction=0.0"],
       "the held-out split .* is empty"),
      ([f"--gin.RM_DATA='{env['data']}'", "--gin.reward_model.init_from_checkpoint=None"],
       "start from a policy"),
      ([f"--gin.RM_DATA='{env['data']}'", "--gin.RewardData.objective='listwise'"],
       "'pointwise' or 'pairwise'"),
  ]
  for flags, pattern in cases:
    gin.clear_config()
    assert entry.run(base + flags) == 2, flags
    _one_line(capsys, pattern)
  gin.clear_config()
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name, devices", [("coder_v2_lite_reward_model", 8),
                                           ("coder_v2_reward_model", 256)])
def test_experiment_dry_runs(name, devices, capsys):
  gin.clear_config()
  report = entry.main([f"--gin_file=gin_configs/experiments/{name}.gin",
                       "--gin.POLICY='/not/here'",   # the dry run uses the model file's config
                       "--gin.MODEL_DIR='/tmp/x'", "--gin.RM_DATA='/tmp/d.jsonl'",
                       "--gin.TOKENIZER='/tmp/t'", f"--gin.reward_model.dry_run_devices={devices}",
                       "--dry_run"])
  gin.clear_config()
  assert report["num_devices"] == devices and "reward model" in capsys.readouterr().out
  lm = {"coder_v2_lite_reward_model": 15.71e9, "coder_v2_reward_model": 236e9}[name]
  assert 0.95 * lm < report["total_params"] < lm   # the backbone, without the LM head
