"""What every command line here does with errors a user can fix: one line, exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)   # ConfigError is a ValueError


def exit_status(main: Callable, argv=None) -> int:
  """Runs main(argv); 0 when it returns, 2 (after one `error: Type: message` line on stderr)
  when it raises one of USER_ERRORS."""
  try:
    main(argv)
  except USER_ERRORS as e:
    print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
    return 2
  return 0


def one_line(e: BaseException) -> str:
  """The message without gin's `In call to configurable ...` notes, on one line."""
  lines = [l.strip() for l in str(e).splitlines()
           if l.strip() and not l.strip().startswith("In call to configurable")]
  return "; ".join(lines)
