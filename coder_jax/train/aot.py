"""Ahead-of-time compilation of a stage's train step for a named TPU topology, on any machine.

    python -m coder_jax.main --gin_file=... --compile_topology=v5p-16 [--compile_topology_num_slices=N]
        [--compile_save=FILE]

libtpu (installed off the import path by scripts/setup.sh, see requirements-test.txt) describes
the topology's devices without a TPU attached; the real train step is built on a mesh of them
(the run's mesh_config), lowered with abstract sharded arguments and compiled by the TPU
compiler on this machine. What comes back is the compiler's answer, per device: the bytes of
the arguments (parameters + optimizer state, the batch), of the temporaries (activations and
workspace) and of the outputs, against the chip's HBM, XLA's FLOPs and bytes per step, and a
roofline bound on the step time and MFU from the chip's published peak FLOP/s and bandwidth.
`--dry_run` stays the fast estimate of the state alone.

Kernels follow the target: under the topology's mesh `auto` picks the Mosaic kernels and
compiles them (pallas_kernels.backends.target_platform), while `jax.default_backend()` stays
cpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import pickle
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coder_jax.model.decoder import DeepseekV2
from coder_jax.parallel.mesh import MeshConfig, MeshError, check_fit, make_mesh
from coder_jax.parallel.rules import MESH_AXES, logical_to_spec
from coder_jax.train import state as train_state


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


# Published per-chip figures (bf16 peak, HBM capacity, HBM bandwidth), as Google states them
# (GB = 1e9 bytes):
#   v4   275 TFLOP/s, 32 GiB, 1,200 GB/s   cloud.google.com/tpu/docs/v4
#   v5e  197 TFLOP/s, 16 GB,    819 GB/s   cloud.google.com/tpu/docs/v5e
#   v5p  459 TFLOP/s, 95 GB,  2,765 GB/s   cloud.google.com/tpu/docs/v5p
#   v6e  918 TFLOP/s, 32 GB,  1,640 GB/s   cloud.google.com/tpu/docs/v6e
# The runtime keeps a little of the HBM for itself, so a margin of a few hundred MiB is thin.
CHIPS = {c.generation: c for c in (
    Chip("v4", 275e12, 32 * 2**30, 1200e9, 2, 3, "megacore"),
    Chip("v5e", 197e12, 16e9, 819e9, 1, 2, "default"),
    Chip("v5p", 459e12, 95e9, 2765e9, 2, 3, "megacore"),
    Chip("v6e", 918e12, 32e9, 1640e9, 1, 2, "default"),
)}


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


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """v5p-N / v4-N (N TensorCores, N/2 chips), v5e-N / v6e-N (N chips), as Cloud TPU and
  MaxText name slices; num_slices of them joined over the data-center network."""
  known = ", ".join(f"{g}-N" for g in CHIPS)
  gen, _, count = name.partition("-")
  chip = CHIPS.get(gen)
  if chip is None or not count.isdigit():
    raise TopologyError(f"--compile_topology: unknown topology {name!r}; use {known} "
                        "(e.g. v5p-8, v5p-256, v5e-256, v6e-256)")
  n = int(count)
  chips = n // chip.cores_per_name if n % chip.cores_per_name == 0 else 0
  grid = _grid(chips, chip.grid_rank) if chips else None
  if grid is None:
    raise TopologyError(f"--compile_topology: {name!r} is not a {gen} slice size; N is "
                        f"{'TensorCores (2 a chip), ' if chip.cores_per_name == 2 else 'chips, '}"
                        f"a power of two from {4 * chip.cores_per_name} (e.g. {gen}-"
                        f"{8 if chip.cores_per_name == 2 else 16})")
  if not isinstance(num_slices, int) or num_slices < 1:
    raise TopologyError(f"--compile_topology_num_slices must be a positive integer, got "
                        f"{num_slices!r}")
  return Topology(name, chip, grid, num_slices)


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


def topology_mesh(mesh_cfg: MeshConfig, topo: Topology, devices=None) -> Mesh:
  """The run's mesh over the topology's devices; with several slices the data axis spans them
  (slices talk over the slower data-center network, which data parallelism needs least)."""
  devices = topology_devices(topo) if devices is None else devices
  try:
    sizes = mesh_cfg.sizes(len(devices))
  except MeshError as e:
    raise TopologyError(f"--compile_topology {topo.name} has {len(devices)} chips"
                        f"{f' ({topo.num_slices} slices)' if topo.num_slices > 1 else ''}; "
                        f"{e}") from None
  if topo.num_slices == 1:
    return make_mesh(mesh_cfg, devices)
  if sizes["data"] % topo.num_slices:
    raise TopologyError(f"--compile_topology_num_slices={topo.num_slices}: the data axis "
                        f"({sizes['data']}) must be a multiple of the slices, which it spans")
  from jax.experimental import mesh_utils
  ici = tuple(sizes[a] // (topo.num_slices if a == "data" else 1) for a in MESH_AXES)
  dcn = tuple(topo.num_slices if a == "data" else 1 for a in MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class CompileRequest:
  """What `--compile_topology` asks a stage for."""
  topology: str
  num_slices: int = 1
  save_to: str | None = None     # write the serialized executable here


# Batch keys the streams fill with floats (everything else is int32 token data).
FLOAT_BATCH_KEYS = ("advantages", "old_logp", "ref_logp", "row_weights", "labels")


def abstract_batch(batch_axes: dict, mesh, batch_size: int, seq_len: int) -> dict:
  """ShapeDtypeStructs of a global batch, laid out as the training loop places it."""
  out = {}
  for key, axes in batch_axes.items():
    shape = (batch_size, seq_len)[:len(axes)]
    dtype = jnp.float32 if key in FLOAT_BATCH_KEYS else jnp.int32
    out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
        mesh, logical_to_spec(axes, shape, mesh)))
  return out


def _sharded(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


@contextlib.contextmanager
def no_persistent_cache():
  """jax's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) stores compile-only TPU
  executables but cannot load them back without a TPU client (a warning, then a recompile):
  keep them out of it."""
  from jax.experimental.compilation_cache import compilation_cache
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


def _compile(jitted, args, mesh):
  """(compiled, None) or (None, the compiler's out-of-memory message)."""
  with jax.set_mesh(mesh):
    lowered = jitted.lower(*args)
  try:
    with no_persistent_cache():
      return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return None, str(e).strip().splitlines()[0]
    raise


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _gib(n: float) -> str:
  """GiB, or MiB below one GiB (tiny models)."""
  return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.2f} MiB"


def compile_train_step(request: CompileRequest, *, cfg, mesh_cfg: MeshConfig, optimizer,
                       schedule, objective, make_step, batch_size: int, seq_len: int,
                       grad_accum_steps: int = 1, model_cls=DeepseekV2,
                       flops_per_token: float | None = None, devices=None,
                       decode: dict | None = None, stage: str = "") -> dict:
  """Compile the stage's train step for `request.topology` and print (and return) the per-device
  memory, cost and roofline. make_step(graphdef) -> the unjitted step, as the loop gets it.
  decode: {rows, prompt_len, max_new_tokens} to compile the sampler (GRPO) as well."""
  topo = parse_topology(request.topology, request.num_slices)
  mesh = topology_mesh(mesh_cfg, topo, devices)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps, seq_len=seq_len)
  graphdef, abstract, specs = train_state.state_specs(cfg, optimizer, mesh, model_cls)
  shardings = train_state.to_shardings(specs, mesh)
  shape = dict(mesh.shape)
  state_bytes = {k: train_state.bytes_per_device(abstract[k], specs[k], shape) for k in abstract}
  batch = abstract_batch(objective.batch_axes, mesh, batch_size, seq_len)
  batch_bytes = train_state.bytes_per_device(
      batch, {k: v.sharding.spec for k, v in batch.items()}, shape)
  chip = topo.chip
  report = {"topology": topo.name, "topology_name": topo.topology_name, "chips": topo.chips,
            "num_slices": topo.num_slices, "mesh": shape, "stage": stage,
            "params_bytes": state_bytes["params"], "opt_state_bytes": state_bytes["opt_state"],
            "batch_bytes": batch_bytes, "hbm_bytes": chip.hbm_bytes,
            "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth}
  head = (f"compile for          {topo.name} ({topo.topology_name}, {topo.chips} chips"
          f"{f', {topo.num_slices} slices' if topo.num_slices > 1 else ''}; "
          f"HBM {_gib(chip.hbm_bytes)} a chip)\n"
          f"mesh                 {' '.join(f'{k}={v}' for k, v in shape.items())}\n"
          f"batch                {batch_size} x {seq_len} tokens ({grad_accum_steps} "
          f"micro-batch{'es' if grad_accum_steps > 1 else ''}); attention_impl "
          f"{cfg.attention_impl}, moe_impl {cfg.moe_impl}")
  print(head, flush=True)
  state_total = sum(state_bytes.values())
  if state_total > chip.hbm_bytes:
    # Not worth minutes of compiling: the float32 state alone overflows the chip.
    report.update(fits=False, compiled=False, total_bytes=state_total,
                  margin_bytes=chip.hbm_bytes - state_total)
    print(f"does NOT fit         parameters {_gib(state_bytes['params'])} + optimizer state "
          f"{_gib(state_bytes['opt_state'])} = {_gib(state_total)} per chip already exceed the "
          f"{_gib(chip.hbm_bytes)} of HBM (short by {_gib(state_total - chip.hbm_bytes)}); not "
          f"compiled. Use more chips (a larger topology) or more fsdp / expert sharding.",
          flush=True)
    return report
  from coder_jax.train.loop import jit_step
  t0 = time.perf_counter()
  state_args = _sharded(abstract, shardings)
  compiled, oom = _compile(jit_step(make_step(graphdef), shardings, mesh), (state_args, batch),
                           mesh)
  report["compile_s"] = time.perf_counter() - t0
  if compiled is None:
    report.update(fits=False, compiled=False, compiler_message=oom)
    print(f"does NOT fit         the TPU compiler ran out of HBM ({report['compile_s']:.0f} s): "
          f"{oom}", flush=True)
    return report
  report.update(_memory(compiled, state_args, batch, chip))
  report["mosaic_kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  tokens = batch_size * seq_len
  model_flops = flops_per_token * tokens / topo.chips if flops_per_token else None
  report.update(_roofline(compiled, model_flops, chip))
  print(_format(report), flush=True)
  if decode:
    report["decode"] = compile_decode(cfg, mesh, graphdef, chip, **decode)
  if request.save_to:
    save_executable(compiled, request.save_to)
    report["saved_to"] = request.save_to
    print(f"saved                the serialized executable to {request.save_to}", flush=True)
  return report


def padded_bytes(shape, dtype, layout) -> int:
  """Bytes of one device's buffer as the TPU lays it out: dims in the layout's major-to-minor
  order, the minor ones rounded up to the first tile (e.g. 8 x 128 for float32)."""
  itemsize = np.dtype(dtype).itemsize
  if layout is None or not getattr(layout, "tiling", None):
    return math.prod(shape) * itemsize
  dims = [shape[i] for i in layout.major_to_minor] or [1]
  tile = layout.tiling[0]
  for j, t in enumerate(tile, start=len(dims) - len(tile)):
    if j >= 0:
      dims[j] = -(-dims[j] // t) * t
  return math.prod(dims) * itemsize


def _laid_out_bytes(compiled, args) -> list[int]:
  """Per argument leaf: the bytes of this device's shard in the compiled input layout."""
  formats = jax.tree.leaves(compiled.input_formats[0])
  leaves = jax.tree.leaves(args)
  return [padded_bytes(a.sharding.shard_shape(a.shape), a.dtype, getattr(f, "layout", None))
          for a, f in zip(leaves, formats)]


def _memory(compiled, state_args, batch_args, chip: Chip) -> dict:
  """Per-device bytes by category from XLA's memory analysis. The arguments split into the
  train state and the batch by their compiled layouts (tile padding included); the donated
  state's outputs alias its arguments, so outputs count what is new (metrics)."""
  m = compiled.memory_analysis()
  args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  total = args + out - alias + temp + code
  laid = _laid_out_bytes(compiled, (state_args, batch_args))
  # Leaves flatten in sorted key order; group them by the top-level key they come from.
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path((state_args, batch_args))[0]]
  by_key: dict = {}
  for path, n in zip(paths, laid):
    key = "batch" if path[0].idx == 1 else path[1].key
    by_key[key] = by_key.get(key, 0) + n
  other = sum(n for k, n in by_key.items() if k not in ("params", "opt_state", "batch"))
  return {"argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
          "code_bytes": code, "compiled_params_bytes": by_key.get("params", 0),
          "compiled_opt_state_bytes": by_key.get("opt_state", 0),
          "compiled_other_state_bytes": other, "compiled_batch_bytes": by_key.get("batch", 0),
          "total_bytes": total,
          "fits": total <= chip.hbm_bytes, "margin_bytes": chip.hbm_bytes - total,
          "compiled": True}


def _roofline(compiled, model_flops: float | None, chip: Chip) -> dict:
  """A lower bound on the step time: the larger of compute at peak and HBM traffic at full
  bandwidth. XLA's count leaves out work inside Pallas kernels (opaque custom calls), so the
  compute side takes the larger of XLA's FLOPs and the model's (6 x active params + attention)."""
  flops, nbytes = _cost(compiled)
  work = max(flops, model_flops or 0.0)
  t = max(work / chip.peak_flops, nbytes / chip.hbm_bandwidth)
  out = {"xla_flops": flops, "xla_bytes": nbytes, "model_flops": model_flops,
         "roofline_s": t, "bound": "compute" if work / chip.peak_flops >= nbytes /
         chip.hbm_bandwidth else "memory"}
  if model_flops and t > 0:
    out["mfu_bound"] = model_flops / (chip.peak_flops * t)
  return out


def _format(r: dict) -> str:
  margin = r["margin_bytes"]
  verdict = (f"fits, {_gib(margin)} to spare" if r["fits"]
             else f"does NOT fit, short by {_gib(-margin)}")
  lines = [
      f"compiled in          {r['compile_s']:.1f} s; Mosaic kernels in the program: "
      f"{r['mosaic_kernels']}",
      f"per device           parameters {_gib(r['compiled_params_bytes'])} + optimizer state "
      f"{_gib(r['compiled_opt_state_bytes'])} as laid out (--dry_run's count: "
      f"{_gib(r['params_bytes'])} + {_gib(r['opt_state_bytes'])}); batch "
      f"{_gib(r['compiled_batch_bytes'])}",
      f"                     temporaries (activations, workspace) {_gib(r['temp_bytes'])}; "
      f"outputs {_gib(r['output_bytes'] - r['alias_bytes'])} beyond the donated state; "
      f"code {_gib(r['code_bytes'])}",
      f"HBM                  {_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])}: {verdict}",
      f"XLA cost / step      {r['xla_flops'] / 1e12:,.2f} TFLOP, {r['xla_bytes'] / 2**30:,.2f} "
      f"GiB accessed per device (Pallas kernels' work is not in XLA's count)",
  ]
  if r.get("model_flops"):
    lines.append(f"roofline             >= {r['roofline_s'] * 1e3:,.1f} ms a step "
                 f"({r['bound']}-bound; model {r['model_flops'] / 1e12:,.2f} TFLOP per device); "
                 f"MFU <= {100 * r['mfu_bound']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s")
  return "\n".join(lines)


def compile_decode(cfg, mesh, graphdef, chip: Chip, *, rows: int, prompt_len: int,
                   max_new_tokens: int) -> dict:
  """Compile the sampler (prefill + the decode loop over the latent cache) GRPO runs on the
  training mesh, with the policy cast to the compute dtype."""
  from coder_jax.decode.generate import _generate
  _, abstract_state = train_state.abstract_model(cfg)
  specs = train_state.param_specs(abstract_state, mesh)
  dt = jnp.dtype(cfg.dtype)
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, dt, sharding=NamedSharding(mesh, s)),
      train_state.abstract_params(abstract_state), specs,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  nnx.replace_by_pure_dict(abstract_state, params)
  split = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
  rows = -(-rows // split) * split
  rep = NamedSharding(mesh, P())
  row_spec = NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh))
  sds = lambda shape, dtype, s=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (graphdef, abstract_state,
          sds((rows, prompt_len), jnp.int32, NamedSharding(
              mesh, logical_to_spec(("batch", None), (rows, prompt_len), mesh))),
          sds((rows,), jnp.int32, row_spec), sds(key.shape, key.dtype),
          sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32), sds((), jnp.int32),
          sds((1, 1), jnp.int32), sds((1,), jnp.bool_))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = _generate.lower(*args, max_new_tokens=max_new_tokens, attend="auto")
  with no_persistent_cache():
    compiled = lowered.compile()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  flops, nbytes = _cost(compiled)
  out = {"rows": rows, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
         "argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
         "output_bytes": m.output_size_in_bytes, "total_bytes": total,
         "fits": total <= chip.hbm_bytes, "xla_flops": flops, "xla_bytes": nbytes,
         "compile_s": time.perf_counter() - t0}
  print(f"sampler              {rows} rows x ({prompt_len} prompt + {max_new_tokens} new) "
        f"tokens, compiled in {out['compile_s']:.1f} s: weights {_gib(m.argument_size_in_bytes)}"
        f" + temporaries (latent cache, activations) {_gib(m.temp_size_in_bytes)} + outputs "
        f"{_gib(m.output_size_in_bytes)} = {_gib(total)} per device: "
        f"{'fits' if out['fits'] else 'does NOT fit'}", flush=True)
  return out


def save_executable(compiled, path: str):
  """The serialized executable and its argument / result trees (jax's serialize_executable),
  pickled: load with `pickle.load` and `deserialize_and_load` on the topology's devices."""
  from jax.experimental.serialize_executable import serialize
  payload, in_tree, out_tree = serialize(compiled)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree}, f)
