"""Limits of one sandboxed run, its Result, and the sandbox's errors."""

from __future__ import annotations

import dataclasses
import math

STATUSES = ("passed", "failed", "timeout", "error", "killed")


class SandboxError(RuntimeError):
  """The sandbox itself could not run a check (not a verdict on the program)."""


class SandboxUnavailable(SandboxError):
  """The requested isolation, or any process cap, is not available on this machine."""


def check_seconds(name: str, value) -> float:
  """`value` as float seconds, or a TypeError / ValueError naming `name`. Public so a caller can
  reject a bad timeout up front (e.g. before hours of generation) exactly as check() would."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a number of seconds, got {value!r}")
  if not math.isfinite(value) or not 0 < value <= 3600:
    raise ValueError(f"{name} must be a finite number of seconds in (0, 3600], got {value!r}")
  return float(value)


def _count(name: str, value, lo: int, hi: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if not lo <= value <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits. `max_processes` counts the program's processes and threads together."""
  wall_s: float = 10.0
  cpu_s: float | None = None  # None: the wall limit
  address_space_bytes: int = 1 << 30  # per process (RLIMIT_AS)
  max_processes: int = 32
  open_files: int = 64
  file_size_bytes: int = 16 << 20  # per file (RLIMIT_FSIZE)
  output_bytes: int = 64 << 10  # kept per stream; the rest is read and dropped
  scratch_bytes: int = 64 << 20  # each tmpfs (/tmp, the work dir) in the namespaces mode
  nice: int = 10  # below the trainer that calls us

  def __post_init__(self):
    check_seconds("wall_s", self.wall_s)
    if self.cpu_s is not None:
      check_seconds("cpu_s", self.cpu_s)
    # The interpreter needs ~30 MiB of address space just to start.
    _count("address_space_bytes", self.address_space_bytes, 64 << 20, 1 << 46)
    _count("max_processes", self.max_processes, 1, 4096)
    _count("open_files", self.open_files, 16, 1 << 20)
    _count("file_size_bytes", self.file_size_bytes, 4096, 1 << 46)
    _count("output_bytes", self.output_bytes, 1, 1 << 30)
    _count("scratch_bytes", self.scratch_bytes, 1 << 20, 1 << 40)
    _count("nice", self.nice, 0, 19)

  @property
  def cpu_limit_s(self) -> float:
    return self.wall_s if self.cpu_s is None else self.cpu_s

  def memory_cap_bytes(self) -> int:
    """The run's cgroup memory cap: one full address space, both scratch tmpfs, and ~3 small
    harness interpreters; a second layer behind RLIMIT_AS (which is per process)."""
    return self.address_space_bytes + 2 * self.scratch_bytes + (96 << 20)


@dataclasses.dataclass(frozen=True)
class Result:
  """The verdict on one program. `passed` only when the test body ran to its end."""
  status: str  # one of STATUSES
  isolation: str  # "namespaces" or "rlimits": the mode this run actually used
  detail: str  # why this status, in words
  exception: str | None = None  # "AssertionError: ..." where the program or test raised
  traceback: str = ""
  stdout: str = ""  # the first Limits.output_bytes bytes, decoded
  stderr: str = ""
  stdout_truncated: bool = False
  stderr_truncated: bool = False
  wall_s: float = 0.0  # the caller's wall time for the whole check, sandbox setup included
  cpu_s: float | None = None  # the worker's CPU time, where known
  workdir: str = ""  # the run's working directory (removed when check returns)

  @property
  def passed(self) -> bool:
    return self.status == "passed"
