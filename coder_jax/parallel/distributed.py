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


def host_rows(sharding, shape: tuple) -> tuple[int, int, int]:
  """(shard, num_shards, first row) of the block of a batch array's rows that this process
  feeds, for an array of `shape` laid out by `sharding` (rows on dimension 0).

  A process feeds every row its devices hold. When the mesh splits the rows over fewer groups
  than there are processes (a context or tensor axis spanning hosts), the processes that hold
  the same rows form one shard and load the same rows; the other dimensions may be split over
  processes too (`place_rows` takes each device's part)."""
  rows = shape[0]
  held = {}
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    start, stop, _ = index[0].indices(rows)
    covered = held.setdefault(device.process_index, set())
    covered.update(range(start, stop))
  blocks = sorted({(min(c), max(c) + 1) for c in held.values()})
  n = len(blocks)
  size = rows // n
  if (rows % n or blocks != [(i * size, (i + 1) * size) for i in range(n)]
      or any(len(c) != max(c) + 1 - min(c) for c in held.values())):
    raise ValueError(f"multi-host: the mesh gives the processes rows {sorted(held.items())[:4]} "
                     f"of the {rows}-row batch, not equal contiguous blocks; order the mesh so "
                     "that each host holds whole rows of one block")
  mine = held[jax.process_index()]
  first = min(mine)
  return blocks.index((first, max(mine) + 1)), n, first


def place_rows(sharding, shape: tuple, local, first_row: int):
  """The global array of `shape` laid out by `sharding` from this process's block of rows
  (`local`, starting at global row `first_row`; see `host_rows`)."""
  def part(index):
    start, stop, _ = index[0].indices(shape[0])
    return local[(slice(start - first_row, stop - first_row),) + tuple(index[1:])]
  return jax.make_array_from_callback(tuple(shape), sharding, part)
