"""What every command line here does with errors a user can fix (one line, exit status 2) and
with the start-up noise of native libraries (kept out of its output unless asked for).

    if __name__ == "__main__":
      sys.exit(command(main))     # main(argv) raises; `command` filters and reports
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
from typing import Callable

# ConfigError is a ValueError; OSError covers a missing input, an existing or unwritable --out.
USER_ERRORS = (ValueError, OSError, RuntimeError)

VERBOSE_ENV = "CODER_JAX_VERBOSE"   # set (to anything but "" or "0") to see everything
_FILTERING_ENV = "_CODER_JAX_STDERR_FILTERED"  # set for child processes: fd 2 is filtered already

# Lines TensorFlow, XLA, CUDA and absl print while starting that say nothing about the run: a
# GPU-less machine's failed cuInit, oneDNN and CPU-instruction notices, absl's pre-init notice,
# tf.data's warning that a cached dataset was not read to the end (the packer stops early), the
# registration of CUDA plugins twice. Every other line passes.
NOISE_PATTERNS = (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"\bcuInit\b",
    r"Could not find cuda drivers on your machine",
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"cache_dataset_ops\.cc",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TF-TRT Warning: Could not find TensorRT",
    r"computation placer already registered",
)
NOISE = re.compile("|".join(NOISE_PATTERNS))


def is_noise(line: str) -> bool:
  return NOISE.search(line) is not None


def exit_status(main: Callable, argv=None) -> int:
  """Runs main(argv); 0 when it returns, 2 (after one `error: Type: message` line on stderr)
  when it raises one of USER_ERRORS."""
  try:
    main(argv)
  except USER_ERRORS as e:
    print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
    return 2
  return 0


def one_line(e: BaseException) -> str:
  """The message without gin's `In call to configurable ...` notes, on one line."""
  lines = [l.strip() for l in str(e).splitlines()
           if l.strip() and not l.strip().startswith("In call to configurable")]
  return "; ".join(lines)


def command(main: Callable, argv=None) -> int:
  """The exit status of a command line: native start-up noise filtered (`quiet_native_logs`),
  then exit_status(main, argv)."""
  quiet_native_logs()
  return exit_status(main, argv)


# The filter runs in a process of its own so that what a crashing process writes last (a fatal
# check, a segfault report) still gets through: it reads until every writer has closed fd 2. A
# partial line (a prompt) is passed on after a short wait.
_FILTER = r"""
import os, re, select, sys
noise = re.compile(sys.argv[1].encode())

def put(b):
  while b:
    b = b[os.write(1, b):]

buf = b""
try:
  while True:
    if buf and not select.select([0], [], [], 0.2)[0]:
      put(buf)
      buf = b""
      continue
    chunk = os.read(0, 1 << 16)
    if not chunk:
      break
    *lines, buf = (buf + chunk).split(b"\n")
    put(b"".join(l + b"\n" for l in lines if not noise.search(l)))
  if buf and not noise.search(buf):
    put(buf)
except (BrokenPipeError, KeyboardInterrupt):
  pass
"""


def quiet_native_logs() -> bool:
  """Keeps NOISE_PATTERNS lines that native code writes to fd 2 out of stderr; True if it did.

  Python's own sys.stderr (progress, warnings, tracebacks) is moved to a duplicate of the real
  stderr and bypasses the filter. Does nothing when CODER_JAX_VERBOSE is set, or when this
  process's stderr already goes through a filter (a command started by another). TensorFlow's
  INFO lines are off too (TF_CPP_MIN_LOG_LEVEL=1 unless set); its warnings and errors are not.
  """
  if os.environ.get(VERBOSE_ENV, "") not in ("", "0") or os.environ.get(_FILTERING_ENV):
    return False
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  try:
    sys.stderr.flush()
    real = os.dup(2)
  except (OSError, ValueError, AttributeError):
    return False
  try:
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, NOISE.pattern],
                            stdin=subprocess.PIPE, stdout=real, stderr=real, close_fds=True)
  except OSError:
    os.close(real)
    return False
  os.dup2(proc.stdin.fileno(), 2)
  proc.stdin.close()       # fd 2 is now this process's only write end of the pipe
  os.environ[_FILTERING_ENV] = "1"
  enc = getattr(sys.stderr, "encoding", None) or "utf-8"
  sys.stderr = open(os.dup(real), "w", buffering=1, encoding=enc, errors="backslashreplace")

  @atexit.register
  def _drain():
    # Native lines written until now reach the terminal before the shell's prompt does.
    try:
      sys.stderr.flush()
      os.dup2(real, 2)
      proc.wait(timeout=2)
    except (OSError, ValueError, subprocess.TimeoutExpired):
      pass

  return True
