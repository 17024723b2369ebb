"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import platform


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (speeds differ far more between CPUs than between
  runs: record it beside every table), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  except OSError:
    names = []
  machine = platform.machine()
  return f"{names[0]} ({machine})" if names else platform.processor() or machine
