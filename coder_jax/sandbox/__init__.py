"""Sandboxed execution of model-written (untrusted) code for RL rewards and evaluation.

    from coder_jax import sandbox
    r = sandbox.check(program, test, timeout_s=10.0)
    r.passed, r.status   # status: "passed" | "failed" | "timeout" | "error" | "killed"
    rs = sandbox.check_many([(program, test), ...], max_workers=8)

Standard library only, and never forks the calling (JAX) process: every check is a fresh
interpreter launched with subprocess. Design, threat model and limits: runner.py, _harness.py.
"""

from coder_jax.sandbox.limits import STATUSES, Limits, Result, SandboxError, SandboxUnavailable
from coder_jax.sandbox.runner import (ENV_ISOLATION, MODES, capabilities, check, check_many,
                                      isolation_mode)

__all__ = ["STATUSES", "Limits", "Result", "SandboxError", "SandboxUnavailable", "ENV_ISOLATION",
           "MODES", "capabilities", "check", "check_many", "isolation_mode"]
