"""Reward-model records from a policy's samples, labelled by the sandbox.

Per problem: `samples` replies sampled from the policy to the SFT chat prompt (BOS, "User:
{problem.prompt}\\n\\nAssistant:"), each reply's content (the function body; the template's
leading space removed) run against the problem's tests (coder_jax.problems.execution_rewards),
and written as pointwise records {"prompt", "response", "passed", "task_id", "source"}. With
`include_reference`, each problem also gives its canonical solution and the empty body
`    pass\\n` (labelled by the sandbox like the samples), so a weak policy whose samples all fail
still yields both classes. Pairwise records ({"prompt", "chosen", "rejected", "task_id"}) pair a
prompt's passing and failing responses: max(#passed, #failed) pairs, the shorter side cycled,
so every response is used and identical pairs are dropped.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

from coder_jax.data.chat import ChatTemplate
from coder_jax.files import write_atomic
from coder_jax.reward.data import generation_prompt, reply_content

EMPTY_BODY = "    pass\n"


def sample_replies(model, tokenizer, problems: Sequence, *, samples: int, temperature: float,
                   max_new_tokens: int, seed: int, batch_size: int,
                   template: ChatTemplate = ChatTemplate()) -> list[list[str]]:
  """`samples` reply contents per problem (problem order)."""
  from coder_jax.decode import generate
  prompts = [generation_prompt(p.prompt, template) for p in problems for _ in range(samples)]
  if not prompts:
    return [[] for _ in problems]
  texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, seed=seed, batch_size=min(batch_size, len(prompts)))
  bodies = [reply_content(t, template) for t in texts]
  return [bodies[i * samples:(i + 1) * samples] for i in range(len(problems))]


def label(problems: Sequence, responses: Sequence[Sequence[tuple[str, str]]], *,
          timeout_s: float):
  """(source, body, passed) per response of each problem, the counts by (source, outcome), and
  the sandbox's verdicts (coder_jax.problems.REWARD_REASONS) over all responses."""
  from coder_jax.problems import execution_rewards
  flat = [(i, src, body) for i, rs in enumerate(responses) for src, body in rs]
  passed, reasons = execution_rewards([problems[i] for i, _, _ in flat],
                                      [b for _, _, b in flat], timeout_s=timeout_s)
  out = [[] for _ in problems]
  counts: collections.Counter = collections.Counter()
  for (i, src, body), ok in zip(flat, passed):
    out[i].append((src, body, bool(ok)))
    counts[(src, "passed" if ok else "failed")] += 1
  return out, counts, reasons


def pointwise_records(problems: Sequence, labelled) -> list[dict]:
  return [{"prompt": p.prompt, "response": body, "passed": ok, "task_id": p.task_id,
           "source": src}
          for p, rs in zip(problems, labelled) for src, body, ok in rs]


def pairwise_records(problems: Sequence, labelled) -> list[dict]:
  out = []
  for p, rs in zip(problems, labelled):
    good = [b for _, b, ok in rs if ok]
    bad = [b for _, b, ok in rs if not ok]
    seen = set()
    for k in range(max(len(good), len(bad)) if good and bad else 0):
      pair = (good[k % len(good)], bad[k % len(bad)])
      if pair[0] != pair[1] and pair not in seen:
        seen.add(pair)
        out.append({"prompt": p.prompt, "chosen": pair[0], "rejected": pair[1],
                    "task_id": p.task_id})
  return out


def check_out(path: str, overwrite: bool):
  """Refuse before sampling: an existing --out (unless overwrite) or a directory."""
  if os.path.isdir(path):
    raise ValueError(f"--out: {path} is a directory; give a file name")
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"--out: {path} exists (pass --overwrite to replace it)")


def write_jsonl(path: str, records: Sequence[dict]):
  """All records or nothing: written beside `path`, then renamed over it."""
  write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build(policy: str, out: str, *, problems_path: str | None = None, split: str | None = "train",
          limit: int | None = None, samples: int = 4, temperature: float = 0.8,
          max_new_tokens: int = 128, include_reference: bool = False, pairs: bool = False,
          seed: int = 0, batch_size: int = 64, timeout_s: float = 5.0, overwrite: bool = False,
          step: int | None = None) -> dict:
  """Samples, labels and writes the records (module docstring); returns counts for callers."""
  from coder_jax import problems as problem_set
  from coder_jax.decode import load
  if samples < 0 or (samples == 0 and not include_reference):
    raise ValueError(f"--samples: {samples}; give >= 1 (or 0 with --include_reference)")
  if limit is not None and limit < 1:
    raise ValueError(f"--limit: must be >= 1, got {limit}")
  if batch_size < 1:
    raise ValueError(f"--batch_size: must be >= 1, got {batch_size}")
  check_out(out, overwrite)
  items, skipped = problem_set.load(problems_path, split=split)
  items = items[:limit]
  if not items:
    raise ValueError(f"--problems: no usable {split or ''} problems in "
                     f"{problems_path or problem_set.default_path()} (skipped: "
                     f"{dict(skipped) or 'none'})")
  model, tok = load(policy, step=step)
  if tok is None:
    raise FileNotFoundError(f"--policy: {policy} has no tokenizer.json (the prompts are "
                            "rendered with the policy's own tokenizer)")
  replies = sample_replies(model, tok, items, samples=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
  responses = [[("policy", r) for r in rs] for rs in replies]
  no_reference = 0
  if include_reference:
    for p, rs in zip(items, responses):
      if p.canonical_solution is None:
        no_reference += 1
      else:
        rs.append(("reference", p.canonical_solution))
      rs.append(("empty", EMPTY_BODY))
  labelled, counts, reasons = label(items, responses, timeout_s=timeout_s)
  records = (pairwise_records if pairs else pointwise_records)(items, labelled)
  write_jsonl(out, records)
  by_source = "; ".join(f"{src} {counts[(src, 'passed')]} passed / {counts[(src, 'failed')]} "
                        "failed" for src in ("policy", "reference", "empty")
                        if counts[(src, "passed")] + counts[(src, "failed")])
  print(f"build: {len(items)} problems ({sum(skipped.values())} malformed skipped"
        + (f", {no_reference} without a canonical solution" if no_reference else "")
        + f") x {samples} samples from {policy}: {by_source} (sandbox: "
        + ", ".join(f"{k} {n}" for k, n in reasons.most_common())
        + f"); wrote {len(records)} {'pairwise' if pairs else 'pointwise'} records to {out}",
        flush=True)
  return {"records": len(records), "problems": len(items), "counts": dict(counts)}
