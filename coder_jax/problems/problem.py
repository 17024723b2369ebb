"""The problem format the reward-model builder and GRPO read, and its loader.

One JSON object per line:
  {"task_id": "cj/0", "prompt": "def f(x: int) -> int:\n    \"\"\"...\"\"\"\n", "entry_point": "f",
   "tests": "def check(candidate):\n    assert candidate(2) == 4\n", "split": "train",
   "canonical_solution": "    return x * 2\n"}
A completion is the function body continuing `prompt` (HumanEval's convention); the program
is prompt + completion, the test is `tests` followed by `check(entry_point)`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import keyword
import os
import re

SPLITS = ("train", "heldout")
REQUIRED = ("task_id", "prompt", "entry_point", "tests", "split")
SKIP_REASONS = (
  "invalid_utf8",  # the line is not UTF-8
  "bad_json",  # the line is not JSON
  "not_an_object",  # JSON, but not an object
  "missing_field",  # one of REQUIRED is absent
  "bad_field",  # a field is not a non-empty str, or holds a NUL byte or a lone surrogate
  "bad_entry_point",  # entry_point is not a Python name (it is pasted into the test)
  "entry_point_not_defined",  # the prompt has no top-level `def entry_point(`
  "no_check_function",  # tests has no top-level `def check(`
  "unknown_split",  # split is not one of SPLITS
  "duplicate_task_id",  # an earlier record has this task_id (the first one is kept)
)


def default_path() -> str:
  """The built-in problem set shipped with the package (see generate.py)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "problems.jsonl")


@dataclasses.dataclass(frozen=True)
class Problem:
  task_id: str
  prompt: str  # the function's signature and docstring; the completion continues it
  entry_point: str  # the function `check` is called on
  tests: str  # defines check(candidate)
  split: str  # one of SPLITS
  canonical_solution: str | None = None  # a reference body, where the source has one

  def program(self, completion: str) -> str:
    return self.prompt + completion

  def test_program(self) -> str:
    # The tests define check(candidate) but, as in HumanEval, never call it.
    return f"{self.tests}\ncheck({self.entry_point})\n"


def _runnable(value) -> bool:
  """A str an interpreter can take: no NUL byte, no lone surrogate (JSON can spell both)."""
  if not isinstance(value, str) or "\x00" in value:
    return False
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def parse_record(line: bytes) -> Problem | str:
  """The Problem on one line, or the SKIP_REASONS entry saying why there is none."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError:
    return "invalid_utf8"
  try:
    obj = json.loads(text)
  except (ValueError, RecursionError):  # deep nesting raises RecursionError, not ValueError
    return "bad_json"
  if not isinstance(obj, dict):
    return "not_an_object"
  if any(k not in obj for k in REQUIRED):
    return "missing_field"
  solution = obj.get("canonical_solution")
  if not all(_runnable(obj[k]) and obj[k] for k in REQUIRED):
    return "bad_field"
  if solution is not None and not _runnable(solution):
    return "bad_field"
  name = obj["entry_point"]
  if not name.isidentifier() or keyword.iskeyword(name):
    return "bad_entry_point"
  defines = rf"^(async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\("
  if not re.search(defines, obj["prompt"], re.MULTILINE):
    return "entry_point_not_defined"
  if not re.search(r"^def[ \t]+check[ \t]*\(", obj["tests"], re.MULTILINE):
    return "no_check_function"
  if obj["split"] not in SPLITS:
    return "unknown_split"
  return Problem(obj["task_id"], obj["prompt"], name, obj["tests"], obj["split"], solution)


def load(path: str | None = None, split: str | None = None
         ) -> tuple[list[Problem], collections.Counter]:
  """Problems from a JSONL file (default: the built-in set), in file order, and a Counter of
  the records skipped by reason (SKIP_REASONS). A bad record is skipped, never raised;
  blank lines are not records. `split` keeps only "train" or "heldout" problems."""
  if split is not None and split not in SPLITS:
    raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
  path = default_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"problems file not found: {path}")
  problems, skipped, seen = [], collections.Counter(), set()
  with open(path, "rb") as fh:
    for line in fh:
      if not line.strip():
        continue
      got = parse_record(line)
      if isinstance(got, Problem) and got.task_id in seen:
        got = "duplicate_task_id"
      if isinstance(got, str):
        skipped[got] += 1
        continue
      seen.add(got.task_id)
      if split is None or got.split == split:
        problems.append(got)
  return problems, skipped
