"""TPU topologies to compile for without a TPU: Cloud TPU's slice names, the chips' published
figures, libtpu's description of a slice's devices, and the run's mesh over them.

    v5p-N / v4-N   N TensorCores (N/2 chips; one megacore device a chip), a 3D torus
    v5e-N / v6e-N  N chips, a 2D torus
    GEN-auto       every slice size of the generation, smallest first (aot.smallest_fit)

libtpu is found where scripts/setup.sh puts it (.venv/libtpu, off the import path: there it
would make every CPU process try to start a TPU), in an importable jax[tpu] install, or at
$TPU_LIBRARY_PATH.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from importlib import metadata

import jax
from jax.sharding import Mesh

from coder_jax.parallel.mesh import MeshConfig, MeshError, make_mesh
from coder_jax.parallel.rules import MESH_AXES


class TopologyError(ValueError):
  """An unknown topology name, a mesh that does not fit it, or no libtpu to compile with."""


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str           # the prefix of the topology names: v5p-8, v6e-256
  peak_flops: float         # dense bf16 FLOP/s per chip
  hbm_bytes: float          # per chip
  hbm_bandwidth: float      # bytes/s per chip
  cores_per_name: int       # v4 / v5p names count TensorCores (2 a chip, one megacore device)
  grid_rank: int            # 3D torus (v4, v5p) or 2D (v5e, v6e)
  chip_config: str
  max_chips: int            # the largest slice (bounds GEN-auto's search)


# Published per-chip figures (bf16 peak, HBM capacity, HBM bandwidth) and largest slice, as
# Google states them (GB = 1e9 bytes):
#   v4   275 TFLOP/s, 32 GiB, 1,200 GB/s, 4,096 chips   cloud.google.com/tpu/docs/v4
#   v5e  197 TFLOP/s, 16 GB,    819 GB/s,   256 chips   cloud.google.com/tpu/docs/v5e
#   v5p  459 TFLOP/s, 95 GB,  2,765 GB/s, 8,960 chips   cloud.google.com/tpu/docs/v5p
#   v6e  918 TFLOP/s, 32 GB,  1,640 GB/s,   256 chips   cloud.google.com/tpu/docs/v6e
# The runtime keeps a little of the HBM for itself, so a margin of a few hundred MiB is thin.
CHIPS = {c.generation: c for c in (
    Chip("v4", 275e12, 32 * 2**30, 1200e9, 2, 3, "megacore", 4096),
    Chip("v5e", 197e12, 16e9, 819e9, 1, 2, "default", 256),
    Chip("v5p", 459e12, 95e9, 2765e9, 2, 3, "megacore", 8960),
    Chip("v6e", 918e12, 32e9, 1640e9, 1, 2, "default", 256),
)}
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                 # as given, e.g. "v5p-16"
  chip: Chip
  grid: tuple[int, ...]     # chips along each torus axis of one slice
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.grid)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"


def _grid(chips: int, rank: int) -> tuple[int, ...] | None:
  """The slice shape Cloud TPU uses for `chips` (a power of two): start from 2x2(x1) and double
  the shortest axis, the last of equals first (v5p-16 is 2x2x2, v5p-32 2x2x4, v6e-32 4x8)."""
  if chips == 1:
    return (1,) * rank
  if chips < 4 or chips & (chips - 1):
    return None
  grid = [2, 2] + [1] * (rank - 2)
  while math.prod(grid) < chips:
    shortest = min(grid)
    i = max(j for j, n in enumerate(grid) if n == shortest)
    grid[i] *= 2
  return tuple(grid)


def _chip_of(name: str) -> tuple[Chip, str]:
  gen, _, count = name.partition("-")
  chip = CHIPS.get(gen)
  if chip is None or not (count.isdigit() or count == AUTO):
    known = ", ".join(f"{g}-N" for g in CHIPS)
    raise TopologyError(f"--compile_topology: unknown topology {name!r}; use {known} "
                        f"(e.g. v5p-8, v5p-256, v5e-256, v6e-256) or GEN-{AUTO} (the smallest "
                        "that fits)")
  return chip, count


def _check_slices(num_slices) -> None:
  if not isinstance(num_slices, int) or num_slices < 1:
    raise TopologyError(f"--compile_topology_num_slices must be a positive integer, got "
                        f"{num_slices!r}")


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """v5p-N / v4-N (N TensorCores, N/2 chips), v5e-N / v6e-N (N chips), as Cloud TPU and
  MaxText name slices; num_slices of them joined over the data-center network."""
  chip, count = _chip_of(name)
  n = int(count) if count.isdigit() else 0
  chips = n // chip.cores_per_name if n % chip.cores_per_name == 0 else 0
  grid = _grid(chips, chip.grid_rank) if chips else None
  if grid is None:
    gen = chip.generation
    raise TopologyError(f"--compile_topology: {name!r} is not a {gen} slice size; N is "
                        f"{'TensorCores (2 a chip), ' if chip.cores_per_name == 2 else 'chips, '}"
                        f"a power of two from {4 * chip.cores_per_name} (e.g. {gen}-"
                        f"{8 if chip.cores_per_name == 2 else 16})")
  _check_slices(num_slices)
  return Topology(name, chip, grid, num_slices)


def topology_candidates(name: str, num_slices: int = 1) -> list[Topology]:
  """The topologies `name` stands for: itself, or for GEN-auto every slice size of the
  generation from the smallest to the largest, in that order."""
  chip, count = _chip_of(name)
  if count != AUTO:
    return [parse_topology(name, num_slices)]
  _check_slices(num_slices)
  chips = [1] if chip.grid_rank == 2 else []
  chips += [2**i for i in range(2, chip.max_chips.bit_length()) if 2**i <= chip.max_chips]
  return [parse_topology(f"{chip.generation}-{c * chip.cores_per_name}", num_slices)
          for c in chips]


def libtpu_spec() -> str:
  """The libtpu requirement of the installed jax's `tpu` extra (e.g. libtpu==0.0.42.*)."""
  for req in metadata.requires("jax") or ():
    head, _, marker = req.partition(";")
    if head.strip().startswith("libtpu") and "tpu" in marker:
      return head.replace(" ", "")
  return "libtpu"


def libtpu_path() -> str | None:
  """libtpu.so to compile with: $TPU_LIBRARY_PATH, an importable libtpu (jax[tpu] installed in
  the environment), or the copy scripts/setup.sh keeps off the import path in .venv/libtpu."""
  env = os.environ.get("TPU_LIBRARY_PATH")
  if env and os.path.isfile(env):
    return env
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "libtpu.so")
    if os.path.isfile(path):
      return path
  path = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
  return path if os.path.isfile(path) else None


def install_hint() -> str:
  return (f"install it with `scripts/setup.sh requirements-test.txt` (puts {libtpu_spec()}, the "
          f"version jax {jax.__version__} pins, in .venv/libtpu) or `pip install "
          f"\"jax[tpu]=={jax.__version__}\"`")


def topology_devices(topo: Topology) -> list:
  """The topology's devices, described by libtpu (compile-only: nothing runs on them)."""
  path = libtpu_path()
  if path is None:
    raise TopologyError(f"--compile_topology: libtpu is not installed, so there is no TPU "
                        f"compiler; {install_hint()}")
  os.environ["TPU_LIBRARY_PATH"] = path
  # Without these libtpu looks for a Cloud TPU VM's host list and prints warnings about it.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.name)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Nothing here touches a chip, so a second compiling process (tests beside a benchmark) need
  # not wait for the lock libtpu takes against processes sharing a TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  host = tuple(min(2, n) for n in topo.grid) + (1,) * (3 - len(topo.grid))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip.chip_config,
      chips_per_host_bounds=host, num_slices=topo.num_slices)
  return list(desc.devices)


def mesh_sizes(mesh_cfg: MeshConfig, topo: Topology) -> dict[str, int]:
  """The run's mesh axis sizes on the topology's chips (TopologyError when they do not fit)."""
  try:
    sizes = mesh_cfg.sizes(topo.chips)
  except MeshError as e:
    raise TopologyError(f"--compile_topology {topo.name} has {topo.chips} chips"
                        f"{f' ({topo.num_slices} slices)' if topo.num_slices > 1 else ''}; "
                        f"{e}") from None
  if sizes["data"] % topo.num_slices:
    raise TopologyError(f"--compile_topology_num_slices={topo.num_slices}: the data axis "
                        f"({sizes['data']}) must be a multiple of the slices, which it spans")
  return sizes


def topology_mesh(mesh_cfg: MeshConfig, topo: Topology, devices=None) -> Mesh:
  """The run's mesh over the topology's devices; with several slices the data axis spans them
  (slices talk over the slower data-center network, which data parallelism needs least)."""
  sizes = mesh_sizes(mesh_cfg, topo)
  devices = topology_devices(topo) if devices is None else devices
  if topo.num_slices == 1:
    return make_mesh(mesh_cfg, devices)
  from jax.experimental import mesh_utils
  ici = tuple(sizes[a] // (topo.num_slices if a == "data" else 1) for a in MESH_AXES)
  dcn = tuple(topo.num_slices if a == "data" else 1 for a in MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
