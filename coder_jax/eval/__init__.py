"""Evaluation: HumanEval pass@k through the sandbox, perplexity on held-out code, and
needle-in-a-haystack retrieval over context lengths (coder_jax/eval/niah.py).

    from coder_jax.eval import evaluate_humaneval, pass_at_k, perplexity
    r = evaluate_humaneval(model, tokenizer, n_samples=10, temperature=0.8, ks=(1, 10))
    r["pass_at_k"]                      # {'pass@1': ..., 'pass@10': ...}
    perplexity(model, batches)          # {'cross_entropy', 'perplexity', 'tokens', ...}

Command line: `python -m coder_jax.eval {humaneval,perplexity,niah} --help`.
"""

from coder_jax.eval.humaneval import (STOP, build_program, build_test, check_completions,
                                      cut_at_stop, evaluate_humaneval, load_problems,
                                      sample_completions, score)
from coder_jax.eval.passk import mean_pass_at_k, pass_at_k
from coder_jax.eval.perplexity import perplexity, validation_batches

__all__ = [
    "STOP", "build_program", "build_test", "check_completions", "cut_at_stop",
    "evaluate_humaneval", "load_problems", "mean_pass_at_k", "pass_at_k", "perplexity",
    "sample_completions", "score", "validation_batches",
]
