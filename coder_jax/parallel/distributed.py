"""Multi-host start-up: `jax.distributed.initialize` from the launchers' environment.

  CODER_JAX_COORDINATOR=host:port CODER_JAX_NUM_PROCESSES=N CODER_JAX_PROCESS_ID=i  (explicit)
  CODER_JAX_DISTRIBUTED=1   (let jax detect the cluster: TPU VM metadata, SLURM variables)
Neither set: a single-process run.
"""

from __future__ import annotations

import os

import jax

_EXPLICIT = ("CODER_JAX_COORDINATOR", "CODER_JAX_NUM_PROCESSES", "CODER_JAX_PROCESS_ID")


def initialize_from_env(env=None) -> bool:
  """Returns True when this process joined a multi-process run."""
  env = os.environ if env is None else env
  given = [k for k in _EXPLICIT if env.get(k)]
  if given and len(given) != len(_EXPLICIT):
    missing = sorted(set(_EXPLICIT) - set(given))
    raise ValueError(f"multi-host: {', '.join(given)} set but {', '.join(missing)} missing")
  if given:
    # Only read by the CPU client (fake-device and loopback runs); must precede backend start-up.
    jax.config.update("jax_cpu_collectives_implementation",
                      env.get("CODER_JAX_CPU_COLLECTIVES", "gloo"))
    jax.distributed.initialize(env["CODER_JAX_COORDINATOR"],
                               num_processes=int(env["CODER_JAX_NUM_PROCESSES"]),
                               process_id=int(env["CODER_JAX_PROCESS_ID"]))
    return True
  if env.get("CODER_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False
