"""Sandboxed execution of model-written (untrusted) code for RL rewards and evaluation.

    from coder_jax import sandbox
    r = sandbox.check(program, test, timeout_s=10.0)
    r.passed, r.status   # status: "passed" | "failed" | "timeout" | "error" | "killed"
    rs = sandbox.check_many([(program, test), ...], max_workers=8)   # input order

Standard library only, and never forks the calling (JAX) process: every check is a fresh
interpreter launched with subprocess (process tree and channels: _harness.py).

Threat model. The program and the test run in one interpreter (the test calls the program's
functions), so a determined program can always lie: return objects whose __eq__ is always true,
patch the modules the test uses, or find and write the completion record itself. The verdict is
built so that accidental and naive tricks never pass: exit codes are never read; sys.exit /
SystemExit / KeyboardInterrupt anywhere, os._exit, signals, killing any harness process,
printing "passed", deleting or rewriting the test file (the test runs from memory) and rebinding
builtins (restored between program and test) all fail. A pass is one completion record, written
after the test body returned, on a pipe only the supervisor reads; the supervisor, outside every
sandbox namespace and not dumpable, writes the verdict with a 128-bit nonce it reads only after
forking (so no sandbox process ever holds it in memory) on an fd no sandbox process has; the
caller accepts only that nonce. The hard guarantee is containment, not honesty: in the
"namespaces" mode nothing the program does reaches host files, the network, other processes, or
goes past the limits, whatever its verdict.
"""

from coder_jax.sandbox.limits import STATUSES, Limits, Result, SandboxError, SandboxUnavailable
from coder_jax.sandbox.runner import (ENV_ISOLATION, MODES, capabilities, check, check_many,
                                      isolation_mode)

__all__ = ["STATUSES", "Limits", "Result", "SandboxError", "SandboxUnavailable", "ENV_ISOLATION",
           "MODES", "capabilities", "check", "check_many", "isolation_mode"]
