"""The execution reward: 1 when a completion passes its problem's tests in the sandbox, else 0.

Every sample gets a reward and exactly one reason (REWARD_REASONS), so a GRPO step can log why
its rewards are 0 (cut-off code is "syntax_error", a wrong result "wrong_answer", and so on).
Nothing a completion does raises here; only a malformed call does (a non-Problem, mismatched
lengths, a bad timeout), and so does a machine without a usable sandbox
(sandbox.SandboxUnavailable): every reward would be 0 there, which would train on nothing and
look like a run that simply learns nothing.
"""

from __future__ import annotations

import ast
import collections
import warnings
from typing import Sequence

import numpy as np

from coder_jax import sandbox
from coder_jax.problems.problem import Problem
from coder_jax.sandbox.limits import check_seconds

REWARD_REASONS = (
  "passed",  # the test ran to its end: reward 1
  "wrong_answer",  # an assert failed: the function ran but returned something else
  "syntax_error",  # the program does not compile (often a completion cut mid-statement)
  "runtime_error",  # any other exception, an exit or a signal before the test ended
  "timeout",  # over the wall or CPU limit
  "killed",  # over a memory, file-size or other resource limit
  "error",  # the sandbox could not judge it (or the problem's own test is broken)
  "not_text",  # the completion is not a str
  "unrunnable",  # a NUL byte or a lone surrogate: no interpreter takes it
)
_SYNTAX = ("SyntaxError", "IndentationError", "TabError")


def reason_of(result: sandbox.Result) -> str:
  """The REWARD_REASONS entry of one sandbox verdict."""
  if result.status != "failed":
    return result.status  # "passed", "timeout", "killed", "error" are reasons as they are
  exc = result.exception or ""
  if exc.startswith(_SYNTAX):
    return "syntax_error"
  if exc.startswith("AssertionError"):
    return "wrong_answer"
  return "runtime_error"


def _unrunnable(text: str) -> bool:
  if "\x00" in text:
    return True
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def execution_rewards(problems: Sequence[Problem], completions: Sequence, *,
                      timeout_s: float = 5.0, max_workers: int | None = None
                      ) -> tuple[np.ndarray, collections.Counter]:
  """Rewards float32 [n] of 0/1 for completions[i] of problems[i], and a Counter of
  REWARD_REASONS over all n samples (a problem repeats once per sample of a group).

  Each program is prompt + completion, its test the problem's tests + check(entry_point), run
  through sandbox.check_many with `timeout_s` each, at most `max_workers` (default: CPU count)
  at once."""
  timeout_s = check_seconds("timeout_s", timeout_s)
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
  for i, p in enumerate(problems):
    if not isinstance(p, Problem):
      raise TypeError(f"problems[{i}] must be a Problem, got {type(p).__name__}")
  rewards = np.zeros(len(problems), np.float32)
  reasons = collections.Counter()
  items, where = [], []
  for i, (p, c) in enumerate(zip(problems, completions)):
    if not isinstance(c, str):
      reasons["not_text"] += 1
    elif _unrunnable(c):  # check_many would fail it too; this names the reason
      reasons["unrunnable"] += 1
    else:
      items.append((p.program(c), p.test_program()))
      where.append(i)
  if items:
    results = sandbox.check_many(items, max_workers=max_workers, timeout_s=timeout_s)
    for i, r in zip(where, results):
      reasons[reason_of(r)] += 1
      rewards[i] = 1.0 if r.passed else 0.0
  return rewards, reasons



def format_rewards(problems: Sequence[Problem], completions: Sequence) -> np.ndarray:
  """1.0 where the problem's prompt + completion compiles and its entry point returns a value
  (a `return <expression>` in the function's own body), else 0.0: a format reward (as
  DeepSeek-R1's) that a policy passing no test yet can still climb, and that an empty or `pass`
  body does not earn. Only parsed, never run; a completion the parser refuses in any way (a NUL
  byte, nesting too deep, not a str) is 0."""
  if len(problems) != len(completions):
    raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
  out = np.zeros(len(completions), np.float32)
  for i, (p, c) in enumerate(zip(problems, completions)):
    if not isinstance(c, str) or _unrunnable(c):
      continue
    try:
      # A sampled body like `return 2if x else 0` compiles with a SyntaxWarning that Python
      # prints on stderr, through the run's progress line: the warning is no part of the reward.
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(p.prompt + c)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
      continue
    out[i] = float(any(_returns_value(node) for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and node.name == p.entry_point))
  return out


def _returns_value(fn) -> bool:
  """A `return <expr>` in fn's body, not counting nested functions' or classes'."""
  todo = list(fn.body)
  while todo:
    node = todo.pop()
    if isinstance(node, ast.Return) and node.value is not None:
      return True
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
      todo.extend(ast.iter_child_nodes(node))
  return False
