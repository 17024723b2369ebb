"""The host allocator setting applied at `import coder_jax`: large blocks come from the heap
(no fresh mapping whose pages fault at every step), and the environment variable turns it off."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates 64 MiB with libc's malloc after importing coder_jax and reports the bytes glibc holds
# in mmapped blocks (mallinfo2's hblkhd) before and during the allocation.
PROBE = r"""
import ctypes, json, sys
import coder_jax
from coder_jax.runtime import keep_host_memory

class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
before = libc.mallinfo2().hblkhd
p = libc.malloc(64 << 20)
during = libc.mallinfo2().hblkhd
libc.free(p)
print(json.dumps({"mapped": during - before, "applies": keep_host_memory()}))
"""


def _probe(env_value):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("CODER_JAX_KEEP_HOST_MEMORY", None)
  if env_value is not None:
    env["CODER_JAX_KEEP_HOST_MEMORY"] = env_value
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_large_blocks_come_from_the_heap_after_import():
  on = _probe(None)
  assert on == {"mapped": 0, "applies": True}
  off = _probe("0")
  assert off["applies"] is False and off["mapped"] >= 64 << 20
