"""coder_jax.eval: pass@k, HumanEval problems through the sandbox, the CLI end to end on a tiny
checkpoint, and perplexity against an independent numpy computation."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pytest

from coder_jax.eval import humaneval as he
from coder_jax.eval.__main__ import run
from coder_jax.eval.passk import mean_pass_at_k, parse_ks, pass_at_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 4


# --- pass@k


def _exact(n, c, k):
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_closed_form():
  assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
  for n in (1, 2, 5, 10, 20, 37):
    for c in range(n + 1):
      prev = -1.0
      for k in range(1, n + 1):
        got = pass_at_k(n, c, k)
        assert got == pytest.approx(_exact(n, c, k), rel=1e-12, abs=1e-12), (n, c, k)
        assert got >= prev - 1e-15  # more tries never lower the chance
        prev = got
      assert pass_at_k(n, c, n) == (1.0 if c else 0.0)
  assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
  # Large n, where the binomials themselves overflow float64.
  assert 0 < pass_at_k(2000, 7, 100) < 1


def test_pass_at_k_rejects_bad_counts():
  for n, c, k in ((5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)):
    with pytest.raises(ValueError):
      pass_at_k(n, c, k)


def test_mean_pass_at_k_skips_k_above_n():
  res, notes = mean_pass_at_k([1, 0, 2], 2, [1, 2, 10])
  assert res == {"pass@1": pytest.approx((0.5 + 0 + 1) / 3), "pass@2": pytest.approx(2 / 3)}
  assert len(notes) == 1 and "pass@10" in notes[0]


def test_parse_ks():
  assert parse_ks("10,1, 1") == [1, 10]
  for bad in ("", "1,x", "0", "-3", "1.5"):
    with pytest.raises(ValueError, match="--k"):
      parse_ks(bad)


# --- problems and programs


@pytest.fixture(scope="module")
def problems():
  return he.load_problems()


def test_problems_load(problems):
  assert len(problems) == he.NUM_PROBLEMS == 164
  assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
  for p in problems:
    assert {"prompt", "entry_point", "canonical_solution", "test"} <= set(p)
    assert f"def {p['entry_point']}" in p["prompt"] and "def check(" in p["test"]
  assert len(he.load_problems(limit=3)) == 3


def test_program_assembly(problems):
  p = problems[0]
  prog = he.build_program(p, "    return True\n")
  assert prog.startswith(p["prompt"]) and prog.endswith("    return True\n")
  test = he.build_test(p)
  assert test.startswith(p["test"]) and test.endswith(f"\ncheck({p['entry_point']})\n")
  comp = "    return 1\n\ndef other():\n    pass\n"
  assert he.cut_at_stop(comp, he.STOP) == "    return 1\n"
  assert he.cut_at_stop("    x = 1\n# done\nprint(x)", he.STOP) == "    x = 1"
  nested = "    if x:\n        print(x)\n"   # indented: not a new top-level statement
  assert he.cut_at_stop(nested, he.STOP) == nested


def test_score_counts_and_rows(problems):
  R = namedtuple("R", "passed status detail")
  probs = problems[:2]
  comps = [["a", "b", "c"], ["d", "e", "f"]]
  res = [[R(True, "passed", ""), R(False, "failed", ""), R(False, "timeout", "")],
         [R(False, "error", "why"), R(False, "failed", ""), R(False, "failed", "")]]
  s = he.score(probs, comps, res, [1, 2, 5])
  assert s["status_counts"] == {"error": 1, "failed": 3, "passed": 1, "timeout": 1}
  assert s["pass_at_k"]["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
  assert s["pass_at_k"]["pass@2"] == pytest.approx((1 - 1 / 3) / 2)
  assert "pass@5" not in s["pass_at_k"] and "pass@5" in s["notes"][0]
  assert [(r["task_id"], r["sample"], r["completion"], r["detail"]) for r in s["rows"]][3] == (
      "HumanEval/1", 0, "d", "why")


def test_round_seeds_distinct():
  seeds = {he.round_seed(s, r) for s in range(20) for r in range(20)}
  assert len(seeds) == 400 and all(0 <= x < 2**30 for x in seeds)


def test_canonical_solutions_pass_and_empty_bodies_fail(problems):
  """328 sandboxed programs: every reference solution passes, every prompt alone fails."""
  t0 = time.perf_counter()
  comps = [[p["canonical_solution"], ""] for p in problems]
  res = he.check_completions(problems, comps, timeout_s=20.0)
  dt = time.perf_counter() - t0
  bad_ref = [(p["task_id"], r[0].status) for p, r in zip(problems, res) if not r[0].passed]
  bad_empty = [(p["task_id"], r[1].status) for p, r in zip(problems, res) if r[1].passed]
  assert not bad_ref, bad_ref
  assert not bad_empty, bad_empty
  s = he.score(problems, comps, res, [1])
  assert s["status_counts"]["passed"] == 164
  print(f"\n328 HumanEval checks in {dt:.1f} s ({328 / dt:.1f} checks/s)")


# --- one bad completion, results written as scored, resuming a killed run

# Completions by (problem, round): these pass (the canonical solution), these the sandbox cannot
# take, every other one is wrong. Correct per problem: 2, 1, 1 of 3.
PASS = {(0, 0), (0, 2), (1, 0), (2, 1)}
UNRUNNABLE = {(1, 1): "    return 1\x00\n", (2, 2): "    return '\ud800'\n"}


class _Killed(Exception):
  pass


def _fake_generate(problems, calls, kill_at=None):
  """Stands in for the model (everything else is real: units, seeds, sandbox, file): the
  completion is fixed by the problem and the round, which it reads back from the seed."""
  index = {p["prompt"]: i for i, p in enumerate(problems)}
  round_of = {he.round_seed(0, r): r for r in range(3)}

  def generate(model, tokenizer, prompts, *, seed, **kw):
    calls.append(seed)
    if len(calls) == kill_at:
      raise _Killed()
    r = next(r for s0, r in round_of.items() if 0 <= seed - s0 < len(problems))
    out = []
    for prompt in prompts:
      i = index[prompt]
      out.append(UNRUNNABLE.get((i, r)) or (problems[i]["canonical_solution"] if (i, r) in PASS
                                            else "    return None\n"))
    return out

  return generate


def _rows_of(path):
  return [json.loads(line) for line in open(path, encoding="ascii").read().splitlines()]


def _key(row):
  return row["task_id"], row["sample"]


def test_bad_completions_fail_alone_and_a_killed_run_resumes(problems, tmp_path, monkeypatch):
  probs = problems[:3]
  kw = dict(problems=probs, n_samples=3, temperature=0.8, batch_size=2, ks=(1, 2, 3),
            timeout_s=20.0)
  calls = []
  monkeypatch.setattr("coder_jax.decode.generate", _fake_generate(probs, calls))
  full = he.evaluate_humaneval(object(), None, out=str(tmp_path / "full.jsonl"), **kw)
  assert len(calls) == 6  # 3 rounds x 2 chunks of problems
  rows = {_key(r): r for r in full["rows"]}
  assert list(rows) == [(f"HumanEval/{i}", s) for i in range(3) for s in range(3)]
  nul, sur = rows[("HumanEval/1", 1)], rows[("HumanEval/2", 2)]
  assert "\x00" in nul["completion"] and "\ud800" in sur["completion"]
  for row, why in ((nul, "contains a NUL byte"), (sur, "contains a lone surrogate U+D800")):
    assert row["status"] == "failed" and not row["passed"] and why in row["detail"], row
  assert {k for k, r in rows.items() if r["passed"]} == {
      (f"HumanEval/{i}", r) for i, r in PASS}
  assert full["status_counts"] == {"failed": 5, "passed": 4}
  correct = [2, 1, 1]
  assert full["pass_at_k"] == pytest.approx(
      {f"pass@{k}": np.mean([_exact(3, c, k) for c in correct]) for k in (1, 2, 3)})
  assert sorted(_rows_of(tmp_path / "full.jsonl"), key=_key) == full["rows"]

  # Killed before the fourth generate call returned: three units' rows are on disk already.
  killed = tmp_path / "killed.jsonl"
  calls = []
  monkeypatch.setattr("coder_jax.decode.generate", _fake_generate(probs, calls, kill_at=4))
  with pytest.raises(_Killed):
    he.evaluate_humaneval(object(), None, out=str(killed), **kw)
  assert [_key(r) for r in _rows_of(killed)] == [
      ("HumanEval/0", 0), ("HumanEval/1", 0), ("HumanEval/2", 0), ("HumanEval/0", 1),
      ("HumanEval/1", 1)]
  with open(killed, "a", encoding="ascii") as fh:  # and a kill in mid-write tears a line
    fh.write(json.dumps(full["rows"][2])[:40])
  listing = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match="exists; pass --resume"):
    he.evaluate_humaneval(object(), None, out=str(killed), **kw)

  calls = []
  monkeypatch.setattr("coder_jax.decode.generate", _fake_generate(probs, calls))
  resumed = he.evaluate_humaneval(object(), None, out=str(killed), resume=True, **kw)
  assert len(calls) == 3  # only the units that still lack rows: (r1, 2-3), (r2, 0-2), (r2, 2-3)
  assert resumed["resumed"] == 5 and resumed["num_checks"] == 4
  assert resumed["rows"] == full["rows"] and resumed["pass_at_k"] == full["pass_at_k"]
  assert sorted(_rows_of(killed), key=_key) == full["rows"]  # the torn line is gone
  assert sorted(os.listdir(tmp_path)) == listing

  # A complete file: nothing is generated, no model is needed, the same numbers come back.
  calls = []
  again = he.evaluate_humaneval(None, None, out=str(killed), resume=True, **kw)
  assert not calls and again["pass_at_k"] == full["pass_at_k"] and again["num_checks"] == 0
  assert "resumed    9 samples" in he.format_summary(again)


def test_resume_refuses_rows_of_another_run(problems, tmp_path):
  out = tmp_path / "r.jsonl"
  row = {"task_id": "HumanEval/5", "sample": 0, "completion": "", "status": "failed",
         "passed": False, "detail": ""}
  for text, match in ((json.dumps(row) + "\n", "HumanEval/5 sample 0, which this run"),
                      (json.dumps({**row, "task_id": "HumanEval/0"}) + "\n" + "{}\n",
                       "line 2 is not a results row"),
                      ("not json\n", "line 1 is not JSON")):
    out.write_text(text)
    with pytest.raises(ValueError, match=match):
      he.evaluate_humaneval(None, None, problems=problems[:2], out=str(out), resume=True)
    assert out.read_text() == text


# --- the command line on a tiny checkpoint


def _tiny_checkpoint(root):
  from coder_jax import hf
  from coder_jax.data.tokenizer import train_tokenizer
  from coder_jax.model import get_config, init_model
  tok = train_tokenizer(SNIPPETS, 400)
  model = init_model(get_config("tiny", vocab_size=512), seed=0)
  path = hf.save(model, str(root))
  tok.save(os.path.join(path, "tokenizer.json"))
  return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf")


def _env():
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cli_humaneval_end_to_end(checkpoint, tmp_path, capsys, monkeypatch):
  out = tmp_path / "results.jsonl"
  cmd = [sys.executable, "-m", "coder_jax.eval", "humaneval", "--checkpoint", checkpoint,
         "--limit", "2", "--n_samples", "2", "--temperature", "0.8", "--top_p", "0.95",
         "--max_new_tokens", "12", "--k", "1,10", "--out", str(out), "--seed", "3"]
  p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 4
  # In scoring order: round 0 (sample 0 of each problem), then round 1.
  assert [(r["task_id"], r["sample"]) for r in rows] == [
      ("HumanEval/0", 0), ("HumanEval/1", 0), ("HumanEval/0", 1), ("HumanEval/1", 1)]
  for r in rows:
    assert set(r) == {"task_id", "sample", "completion", "status", "passed", "detail"}
    assert r["status"] in ("passed", "failed", "timeout", "error", "killed") and r["detail"]
    assert r["passed"] == (r["status"] == "passed")
    assert not any(s in r["completion"] for s in he.STOP)
  assert "pass@1" in p.stdout and "pass@10 skipped" in p.stdout
  assert "status" in p.stdout and "samples/s" in p.stdout and "checks/s" in p.stdout
  pass_lines = [line for line in p.stdout.splitlines() if line.startswith("pass@")]

  # A kill after the first row, in the middle of the second: --resume regenerates with the real
  # model, here in this process, exactly the text the uninterrupted run wrote.
  lines = out.read_text().splitlines(keepends=True)
  out.write_text(lines[0] + lines[1][:30])
  assert run(cmd[3:] + ["--resume"]) == 0
  resumed = capsys.readouterr().out
  assert sorted(map(json.loads, out.read_text().splitlines()), key=_key) == sorted(rows, key=_key)
  assert [line for line in resumed.splitlines() if line.startswith("pass@")] == pass_lines
  assert "resumed    1 samples" in resumed

  # Resuming a complete file reports without loading the model at all.
  import coder_jax.eval.__main__ as cli
  monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded"))
  assert run(cmd[3:] + ["--resume"]) == 0
  assert [line for line in capsys.readouterr().out.splitlines()
          if line.startswith("pass@")] == pass_lines


def test_cli_errors_exit_2(checkpoint, tmp_path, capsys):
  def err_of(argv):
    assert run(argv) == 2
    e = capsys.readouterr().err.strip()
    assert e.startswith("error:") and "\n" not in e, e
    return e

  missing = str(tmp_path / "nope")
  assert missing in err_of(["humaneval", "--checkpoint", missing])
  assert "--k" in err_of(["humaneval", "--checkpoint", checkpoint, "--k", "1,zero"])
  assert "--k" in err_of(["humaneval", "--checkpoint", checkpoint, "--k", "0"])
  bare = str(tmp_path / "bare")
  shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer.json"))
  assert "--tokenizer" in err_of(["humaneval", "--checkpoint", bare, "--limit", "1",
                                  "--out", str(tmp_path / "r.jsonl")])
  assert not os.path.exists(tmp_path / "r.jsonl")
  assert "--data_dir" in err_of(["perplexity", "--checkpoint", checkpoint, "--data_dir", missing])
  with pytest.raises(SystemExit) as e:  # argparse's own errors also exit 2
    run(["humaneval", "--checkpoint", checkpoint, "--n_samples", "0"])
  assert e.value.code == 2


def test_cli_checks_every_flag_before_loading_the_model(checkpoint, tmp_path, capsys,
                                                       monkeypatch):
  import coder_jax.eval.__main__ as cli
  loads = []
  monkeypatch.setattr(cli, "load_checkpoint", lambda *a, **k: loads.append(a))

  def err_of(argv):
    assert run(argv) == 2
    e = capsys.readouterr().err.strip()
    assert e.startswith("error:") and "\n" not in e, e
    return e

  out = tmp_path / "r.jsonl"
  base = ["humaneval", "--checkpoint", checkpoint, "--limit", "1", "--out", str(out)]
  for flags, name in ((["--timeout_s", "0"], "--timeout_s"), (["--timeout_s", "-1"], "--timeout_s"),
                      (["--timeout_s", "nan"], "--timeout_s"),
                      (["--timeout_s", "1e9"], "--timeout_s"),
                      (["--temperature", "-0.5"], "--temperature"),
                      (["--temperature", "inf"], "--temperature"), (["--top_p", "0"], "--top_p"),
                      (["--top_p", "1.5"], "--top_p"), (["--top_k", "-1"], "--top_k"),
                      (["--seed", "-1"], "--seed"), (["--k", "0"], "--k"),
                      (["--resume", "--overwrite"], "--resume and --overwrite")):
    assert name in err_of(base + flags), flags
  assert not loads and os.listdir(tmp_path) == []  # nothing loaded, nothing written

  # An existing --out is never overwritten in silence, nor taken for results when it is none.
  out.write_text("precious\n")
  e = err_of(base)
  assert "--out" in e and "exists" in e and "--resume" in e and "--overwrite" in e
  assert "line 1 is not JSON" in err_of(base + ["--resume"])
  assert "not a regular file" in err_of(base[:-1] + [str(tmp_path)])
  assert not loads and out.read_text() == "precious\n" and os.listdir(tmp_path) == ["r.jsonl"]


# --- perplexity


def _batch(rng, vocab, rows, seq_len, lengths):
  from coder_jax.data.pipeline import pack
  pieces = [rng.integers(6, vocab, n).astype(np.int32) for n in lengths]
  packed = list(pack(iter(pieces), seq_len, 1))
  packed += [{k: np.zeros_like(v) for k, v in packed[0].items()}] * (rows - len(packed))
  b = {k: np.stack([r[k] for r in packed[:rows]]) for k in packed[0]}
  # Garbage where there is no token: it must not count.
  pad = b["segment_ids"] == 0
  b["targets"] = np.where(pad, rng.integers(0, vocab, pad.shape), b["targets"]).astype(np.int32)
  return b


def _numpy_ce(model, batches):
  total, count = 0.0, 0
  for b in batches:
    logits = np.asarray(model(b["inputs"], b["segment_ids"], b["positions"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    keep = b["segment_ids"] > 0
    total += nll[keep].sum()
    count += int(keep.sum())
  return total / count, count


def test_perplexity_matches_numpy():
  from coder_jax.eval.perplexity import perplexity
  from coder_jax.model import get_config, init_model
  model = init_model(get_config("tiny", vocab_size=96), seed=1)
  rng = np.random.default_rng(0)
  # Two batches with different token counts: the mean is over tokens, not over batches.
  batches = [_batch(rng, 96, 2, 32, [20, 9, 17]), _batch(rng, 96, 2, 32, [5])]
  ce, count = _numpy_ce(model, batches)
  r = perplexity(model, batches)
  assert r["tokens"] == count == 51 and r["batches"] == 2
  assert r["cross_entropy"] == pytest.approx(ce, rel=1e-5)
  assert r["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
  assert perplexity(model, batches, max_batches=1)["tokens"] == 46
  with pytest.raises(ValueError, match="no scored"):
    perplexity(model, [{k: np.zeros_like(v) for k, v in batches[0].items()}])


def test_cli_perplexity_on_a_built_corpus(checkpoint, tmp_path, capsys):
  from coder_jax.data.prepare import prepare
  src = tmp_path / "src"
  src.mkdir()
  for i, s in enumerate(SNIPPETS[:5] * 3):
    (src / f"m{i}.py").write_text(f"# module {i}\n" + s * (i + 1))
  data = tmp_path / "data"
  prepare(str(data), [str(src)], tokenizer=os.path.join(checkpoint, "tokenizer.json"),
          validation_fraction=0.4)
  assert run(["perplexity", "--checkpoint", checkpoint, "--data_dir", str(data),
              "--seq_len", "64", "--batch_size", "2", "--batches", "3"]) == 0
  out = capsys.readouterr().out
  ppl = float(out.split("perplexity ")[1].split()[0])
  assert 1 < ppl < 1e4 and "non-padding" in out
  # A split the corpus does not have: named, with the ones it has.
  assert run(["perplexity", "--checkpoint", checkpoint, "--data_dir", str(data),
              "--split", "nosuch"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ValueError: --split:") and "\n" not in err, err
  assert "'nosuch'" in err and "splits with data: train, validation" in err, err
  # Data tokenized by another tokenizer than the model's own: refused unless told otherwise.
  other_src = tmp_path / "other_src"
  other_src.mkdir()
  (other_src / "a.py").write_text("".join(SNIPPETS[::-1]) * 4)
  other = tmp_path / "other"
  prepare(str(other), [str(other_src)], vocab_size=300, validation_fraction=0.5)
  flags = ["perplexity", "--checkpoint", checkpoint, "--data_dir", str(other), "--seq_len", "64",
           "--batch_size", "2", "--batches", "1"]
  assert run(flags) == 2
  err = capsys.readouterr().err.strip()
  assert "is not the tokenizer this model was trained with" in err and "\n" not in err, err
  assert run(flags + ["--allow_tokenizer_mismatch"]) == 0
