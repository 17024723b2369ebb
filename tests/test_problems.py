"""coder_jax.problems: the shipped problem set (clean, split, reproducible, every canonical body
passing and every empty body failing in the sandbox), the loader's handling of bad records, and
the execution reward's verdicts."""

import collections
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from coder_jax import problems
from coder_jax.problems import generate
from coder_jax.problems.families.spec import Spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOUBLE = problems.Problem(
    task_id="t/double",
    prompt=('def double(x: int) -> int:\n'
            '    """Return 2 * x.\n\n    >>> double(2)\n    4\n    """\n'),
    entry_point="double",
    tests="def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
    split="train")


# --- the shipped set


def test_shipped_set_loads_clean_with_both_splits():
  ps, skipped = problems.load()
  assert skipped == collections.Counter()
  assert len(ps) >= 150
  assert len({p.task_id for p in ps}) == len(ps)
  assert all(p.canonical_solution for p in ps)
  train, _ = problems.load(split="train")
  heldout, _ = problems.load(split="heldout")
  assert {p.split for p in train} == {"train"} and {p.split for p in heldout} == {"heldout"}
  assert len(train) + len(heldout) == len(ps)
  assert 0.15 <= len(heldout) / len(ps) <= 0.25
  # Whole families are held out: no held-out function name also appears in training.
  assert not {p.entry_point for p in heldout} & {p.entry_point for p in train}


def test_generator_reproduces_the_shipped_file_byte_for_byte(tmp_path):
  with open(problems.default_path(), "rb") as fh:
    shipped = fh.read()
  assert generate.render(generate.build_records()) == shipped
  # The script itself, under another hash seed: no output may depend on set or dict hash order.
  out = tmp_path / "problems.jsonl"
  env = dict(os.environ, PYTHONPATH=REPO, PYTHONHASHSEED="12345")
  proc = subprocess.run([sys.executable, "-m", "coder_jax.problems.generate", "--out", str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes() == shipped
  check = subprocess.run([sys.executable, "-m", "coder_jax.problems.generate", "--check"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert check.returncode == 0 and "up to date" in check.stdout


def test_canonical_solutions_survive_the_generation_stop_strings():
  # Sampling cuts a completion at these (a new top-level statement); a reference body that
  # contained one would be cut too, e.g. when it is used as an SFT target.
  from coder_jax.eval.humaneval import STOP
  ps, _ = problems.load()
  for p in ps:
    assert not any(s in p.canonical_solution for s in STOP), p.task_id


def test_every_canonical_solution_passes_and_every_empty_body_fails():
  ps, _ = problems.load()
  # Half the empty bodies are "" (the docstring alone), half `pass`: both return None.
  empty = ["" if i % 2 else "    pass\n" for i in range(len(ps))]
  rewards, reasons = problems.execution_rewards(
      ps + ps, [p.canonical_solution for p in ps] + empty, timeout_s=10.0, max_workers=4)
  n = len(ps)
  failed = [ps[i].task_id for i in range(n) if rewards[i] != 1.0]
  assert not failed, f"canonical solutions failing: {failed}"
  passed = [ps[i].task_id for i in range(n) if rewards[n + i] != 0.0]
  assert not passed, f"empty bodies passing: {passed}"
  assert reasons == collections.Counter(passed=n, wrong_answer=n)


def test_generator_rejects_tests_a_trivial_body_would_pass():
  spec = Spec("sign(x: int) -> int", "Return 1.", "return 1", ((1,), (2,), (3,), (4,), (5,)))
  with pytest.raises(ValueError, match="a constant passes"):
    generate.make_record("t/0", spec, "train")
  spec = Spec("same(x: int) -> int", "Return x.", "return abs(x)", ((1,), (2,), (3,), (4,), (5,)))
  with pytest.raises(ValueError, match="an identity passes"):
    generate.make_record("t/0", spec, "train")
  spec = Spec("few(x: int) -> int", "Return 2x.", "return 2 * x", ((1,), (2,), (1,), (3,)))
  with pytest.raises(ValueError, match="3 distinct inputs"):
    generate.make_record("t/0", spec, "train")


# --- the loader


def _record(**overrides):
  rec = {"task_id": "u/0", "prompt": DOUBLE.prompt, "entry_point": "double",
         "tests": DOUBLE.tests, "split": "train"}
  rec.update(overrides)
  return {k: v for k, v in rec.items() if v is not ...}


def test_every_malformed_record_is_skipped_and_counted(tmp_path):
  good = _record(task_id="u/good", canonical_solution="    return 2 * x\n")
  lines = [json.dumps(good).encode(), b"", b"   ",
           b"\xff\xfe not utf-8",
           b"{not json",
           b"[" * 100000 + b"]" * 100000,  # nested past the recursion limit
           b"[1, 2]",
           json.dumps(_record(task_id="u/1", tests=...)).encode(),
           json.dumps(_record(task_id=7)).encode(),
           json.dumps(_record(task_id="u/2", prompt="")).encode(),
           json.dumps(_record(task_id="u/3", tests="def check(c):\x00\n")).encode(),
           json.dumps(_record(task_id="u/4", canonical_solution=["x"])).encode(),
           json.dumps(_record(task_id="u/5", prompt="def f(x):\n    '\ud800'\n",
                              entry_point="f")).encode(),
           json.dumps(_record(task_id="u/6", entry_point="double); import os; (")).encode(),
           json.dumps(_record(task_id="u/7", entry_point="triple")).encode(),
           json.dumps(_record(task_id="u/8", entry_point="dou")).encode(),  # a prefix is no def
           json.dumps(_record(task_id="u/9", tests="assert double(2) == 4\n")).encode(),
           json.dumps(_record(task_id="u/10", split="test")).encode(),
           json.dumps(_record(prompt=DOUBLE.prompt + "# second\n", task_id="u/good")).encode()]
  path = tmp_path / "p.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  ps, skipped = problems.load(str(path))
  assert skipped == collections.Counter(
      invalid_utf8=1, bad_json=2, not_an_object=1, missing_field=1, bad_field=5,
      bad_entry_point=1, entry_point_not_defined=2, no_check_function=1, unknown_split=1,
      duplicate_task_id=1)
  assert set(skipped) <= set(problems.SKIP_REASONS)
  assert ps == [problems.Problem("u/good", DOUBLE.prompt, "double", DOUBLE.tests, "train",
                                 "    return 2 * x\n")]  # the first of the duplicates
  assert problems.load(str(path), split="heldout") == ([], skipped)


def test_load_errors_are_one_line(tmp_path):
  missing = tmp_path / "nope.jsonl"
  with pytest.raises(FileNotFoundError) as e:
    problems.load(str(missing))
  assert str(missing) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="split must be one of"):
    problems.load(split="valid")


def test_an_unindented_async_or_helper_defined_entry_point_loads(tmp_path):
  prompt = "def helper(x):\n    return x\n\n\nasync def main(x):\n    \"\"\"Await nothing.\"\"\"\n"
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps(_record(prompt=prompt, entry_point="main")) + "\n")
  ps, skipped = problems.load(str(path))
  assert [p.entry_point for p in ps] == ["main"] and not skipped


# --- the execution reward


def test_execution_rewards_verdicts():
  completions = ["    return 2 * x\n",  # right
                 "    return x + 2\n",  # right for 2, wrong for -3
                 "    return 2 * x\x00\n",
                 "    return '\ud800'\n",
                 "    raise RuntimeError('no')\n",
                 "    return (\n",  # cut mid-expression
                 "    import sys\n    sys.exit(0)\n",  # an exit is never a pass
                 None,
                 ""]
  rewards, reasons = problems.execution_rewards([DOUBLE] * len(completions), completions)
  assert rewards.dtype == np.float32 and rewards.shape == (len(completions),)
  np.testing.assert_array_equal(rewards, [1, 0, 0, 0, 0, 0, 0, 0, 0])
  assert reasons == collections.Counter(passed=1, wrong_answer=2, unrunnable=2, runtime_error=2,
                                        syntax_error=1, not_text=1)
  assert set(reasons) <= set(problems.REWARD_REASONS)


def test_format_rewards_need_a_compiling_body_that_returns_a_value():
  completions = ["    return 2 * x\n",
                 "    if x:\n        return x\n    return -x\n",  # a return in a branch
                 "    y = x\n    return y if y else 0\n",
                 "",                                   # the docstring alone compiles
                 "    pass\n",
                 "    if x:\n        return\n",         # returns no value
                 "    def g():\n        return 1\n",    # only a nested function returns
                 "    return (\n",                       # does not compile
                 "    return 2 * x\x00\n",
                 "    return " + "(" * 5000 + "x" + ")" * 5000 + "\n",  # too deep for the parser
                 None]
  got = problems.format_rewards([DOUBLE] * len(completions), completions)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="1 problems but 2 completions"):
    problems.format_rewards([DOUBLE], ["", ""])


def test_format_rewards_keep_python_syntax_warnings_off_stderr():
  # `2if` compiles with "SyntaxWarning: invalid decimal literal", which Python would print
  # through the GRPO run's progress line: the reward is still 1 and nothing is warned.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = problems.format_rewards([DOUBLE], ["    return 2if x else 0\n"])
  np.testing.assert_array_equal(got, [1])
  assert [str(w.message) for w in caught] == []


def test_execution_rewards_timeout():
  rewards, reasons = problems.execution_rewards(
      [DOUBLE], ["    while True:\n        pass\n"], timeout_s=0.5)
  assert rewards.tolist() == [0.0] and reasons == collections.Counter(timeout=1)


def test_execution_rewards_bad_calls():
  rewards, reasons = problems.execution_rewards([], [])
  assert rewards.shape == (0,) and rewards.dtype == np.float32 and not reasons
  with pytest.raises(ValueError, match="1 problems but 2 completions"):
    problems.execution_rewards([DOUBLE], ["", ""])
  with pytest.raises(TypeError, match=r"problems\[0\] must be a Problem"):
    problems.execution_rewards([{"prompt": "x"}], [""])
  with pytest.raises(ValueError, match="timeout_s"):
    problems.execution_rewards([DOUBLE], [""], timeout_s=0)
