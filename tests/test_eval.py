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
  R = namedtuple("R", "passed status")
  probs = problems[:2]
  comps = [["a", "b", "c"], ["d", "e", "f"]]
  res = [[R(True, "passed"), R(False, "failed"), R(False, "timeout")],
         [R(False, "error"), R(False, "failed"), R(False, "failed")]]
  s = he.score(probs, comps, res, [1, 2, 5])
  assert s["status_counts"] == {"error": 1, "failed": 3, "passed": 1, "timeout": 1}
  assert s["pass_at_k"]["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
  assert s["pass_at_k"]["pass@2"] == pytest.approx((1 - 1 / 3) / 2)
  assert "pass@5" not in s["pass_at_k"] and "pass@5" in s["notes"][0]
  assert [(r["task_id"], r["sample"], r["completion"]) for r in s["rows"]][3] == (
      "HumanEval/1", 0, "d")


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


def test_cli_humaneval_end_to_end(checkpoint, tmp_path):
  out = tmp_path / "results.jsonl"
  cmd = [sys.executable, "-m", "coder_jax.eval", "humaneval", "--checkpoint", checkpoint,
         "--limit", "2", "--n_samples", "2", "--temperature", "0.8", "--top_p", "0.95",
         "--max_new_tokens", "12", "--k", "1,10", "--out", str(out), "--seed", "3"]
  p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 4
  assert [(r["task_id"], r["sample"]) for r in rows] == [
      ("HumanEval/0", 0), ("HumanEval/0", 1), ("HumanEval/1", 0), ("HumanEval/1", 1)]
  for r in rows:
    assert set(r) == {"task_id", "sample", "completion", "status", "passed"}
    assert r["status"] in ("passed", "failed", "timeout", "error", "killed")
    assert r["passed"] == (r["status"] == "passed")
    assert not any(s in r["completion"] for s in he.STOP)
  assert "pass@1" in p.stdout and "pass@10 skipped" in p.stdout
  assert "status" in p.stdout and "samples/s" in p.stdout and "checks/s" in p.stdout


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
  assert "--tokenizer" in err_of(["humaneval", "--checkpoint", bare, "--limit", "1"])
  assert "--data_dir" in err_of(["perplexity", "--checkpoint", checkpoint, "--data_dir", missing])
  with pytest.raises(SystemExit) as e:  # argparse's own errors also exit 2
    run(["humaneval", "--checkpoint", checkpoint, "--n_samples", "0"])
  assert e.value.code == 2


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
