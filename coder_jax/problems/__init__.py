"""The project's own problem set (small Python functions with tests) and the execution reward.

    from coder_jax import problems
    train, skipped = problems.load(split="train")   # the built-in set; or load("my.jsonl")
    rewards, reasons = problems.execution_rewards(train[:2], ["    return x + 3\n", "    pass\n"])

The set is made by the project (coder_jax/problems/generate.py writes data/problems.jsonl from
the families in families/), so it never overlaps HumanEval, which stays held out for
evaluation. Whole families form the "heldout" split. Nothing here imports jax;
`execution_rewards` runs programs through coder_jax.sandbox.
"""

from coder_jax.problems.problem import (SKIP_REASONS, SPLITS, Problem, default_path, load,
                                        parse_record)
from coder_jax.problems.rewards import (REWARD_REASONS, execution_rewards, reason_of,
                                        format_rewards)

__all__ = ["SKIP_REASONS", "SPLITS", "Problem", "default_path", "load", "parse_record",
           "REWARD_REASONS", "execution_rewards", "reason_of", "format_rewards"]
