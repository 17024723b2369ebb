"""Process-wide settings the stack applies when it is imported.

`keep_host_memory`: XLA:CPU allocates a step's large buffers (logits, activations, their
gradients) afresh at every call. glibc serves an allocation above its mmap threshold (at most
32 MB, however it adapts) with a fresh mapping, so every page of such a buffer faults on first
touch, at every step: on 2 cores a [2048, 512] x [512, 4096] product took 54 ms, 33 ms with the
buffer from the heap, and a model's forward + backward lost about 13%. So large blocks come from
the heap and freed memory stays with the process (its size is the peak of one step anyway).
Set CODER_JAX_KEEP_HOST_MEMORY=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEEP_HOST_MEMORY_ENV = "CODER_JAX_KEEP_HOST_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters


def keep_host_memory() -> bool:
  """Large host allocations from the heap, freed memory kept (glibc's mallopt: mmap and trim
  thresholds at their maximum). Returns whether the allocator took the settings: False when
  disabled by the environment, off Linux, or without glibc."""
  if os.environ.get(KEEP_HOST_MEMORY_ENV, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):      # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  big = 2**31 - 1
  return mallopt(_M_MMAP_THRESHOLD, big) == 1 and mallopt(_M_TRIM_THRESHOLD, big) == 1
