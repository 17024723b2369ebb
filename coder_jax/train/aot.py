"""Ahead-of-time compilation of a stage's train step for a named TPU topology, on any machine.

    python -m coder_jax.main --gin_file=... --compile_topology=v5p-16 [--compile_topology_num_slices=N]
        [--compile_save=FILE]
    python -m coder_jax.main --gin_file=... --compile_topology=v5p-auto   # the smallest that fits

libtpu describes the topology's devices without a TPU attached (train/topology.py: the names,
the chips' published figures, the mesh); the real train step is built on a mesh of them
(the run's mesh_config), lowered with abstract sharded arguments and compiled by the TPU
compiler on this machine. What comes back is the compiler's answer, per device: the bytes of
the arguments (parameters + optimizer state, the batch), of the temporaries (activations and
workspace) and of the outputs, against the chip's HBM, XLA's FLOPs and bytes per step, and a
roofline bound on the step time and MFU from the chip's published peak FLOP/s and bandwidth.
`--dry_run` stays the fast estimate of the state alone.

`GEN-auto` searches the generation's slices from the smallest up: sizes the mesh or the batch
cannot divide over, and sizes whose float32 parameters, Adam state and gradients (--dry_run's
count) overflow a chip, are skipped without compiling; the others are compiled in turn until
one fits (the compiler's answer, activations included).

Kernels follow the target: under the topology's mesh `auto` picks the Mosaic kernels and
compiles them (pallas_kernels.backends.target_platform), while `jax.default_backend()` stays
cpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.model.decoder import DeepseekV2
from coder_jax.parallel.mesh import MeshConfig, MeshError, abstract_mesh, check_fit
from coder_jax.parallel.rules import logical_to_spec
from coder_jax.train import state as train_state
# The topology side lives in train/topology.py; its names are part of this module's interface.
from coder_jax.train.topology import (  # noqa: F401
    CHIPS, Chip, Topology, TopologyError, install_hint, libtpu_path, libtpu_spec, mesh_sizes,
    parse_topology, topology_candidates, topology_devices, topology_mesh)


@dataclasses.dataclass(frozen=True)
class CompileRequest:
  """What `--compile_topology` asks a stage for."""
  topology: str
  num_slices: int = 1
  save_to: str | None = None     # write the serialized executable here


# Batch keys the streams fill with floats (everything else is int32 token data).
FLOAT_BATCH_KEYS = ("advantages", "old_logp", "ref_logp", "row_weights", "labels")


def _sds(shape, dtype, mesh, spec=P()) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def abstract_batch(batch_axes: dict, mesh, batch_size: int, seq_len: int) -> dict:
  """ShapeDtypeStructs of a global batch, laid out as the training loop places it."""
  out = {}
  for key, axes in batch_axes.items():
    shape = (batch_size, seq_len)[:len(axes)]
    dtype = jnp.float32 if key in FLOAT_BATCH_KEYS else jnp.int32
    out[key] = _sds(shape, dtype, mesh, logical_to_spec(axes, shape, mesh))
  return out


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


def _compile(lower, mesh):
  """(compiled, None, seconds) or (None, the compiler's out-of-memory message, seconds);
  lower() -> jax's Lowered, called under the mesh."""
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = lower()
  try:
    with no_persistent_cache():
      return lowered.compile(), None, time.perf_counter() - t0
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return None, str(e).strip().splitlines()[0], time.perf_counter() - t0
    raise


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _total(m) -> int:
  """Per-device HBM of a compiled program: outputs that alias donated arguments count once."""
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def _gib(n: float) -> str:
  """GiB, or MiB below one GiB (tiny models)."""
  return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.2f} MiB"


def _state_bytes(cfg, optimizer, mesh, model_cls) -> tuple[object, dict, dict, dict]:
  """(graphdef, abstract state, specs, {params, opt_state, ...: bytes per device})."""
  graphdef, abstract, specs = train_state.state_specs(cfg, optimizer, mesh, model_cls)
  shape = dict(mesh.shape)
  nbytes = {k: train_state.bytes_per_device(abstract[k], specs[k], shape) for k in abstract}
  return graphdef, abstract, specs, nbytes


def compile_train_step(request: CompileRequest, *, cfg, mesh_cfg: MeshConfig, optimizer,
                       schedule, objective, make_step, batch_size: int, seq_len: int,
                       grad_accum_steps: int = 1, model_cls=DeepseekV2,
                       flops_per_token: float | None = None, devices=None,
                       decode: dict | None = None, stage: str = "") -> dict:
  """Compile the stage's train step for `request.topology` and print (and return) the per-device
  memory, cost and roofline. make_step(graphdef) -> the unjitted step, as the loop gets it.
  decode: {rows, prompt_len, max_new_tokens, group} to compile the sampler (GRPO) as well.
  A GEN-auto topology searches for the smallest slice that fits (smallest_fit)."""
  kw = dict(cfg=cfg, mesh_cfg=mesh_cfg, optimizer=optimizer, objective=objective,
            make_step=make_step, batch_size=batch_size, seq_len=seq_len,
            grad_accum_steps=grad_accum_steps, model_cls=model_cls,
            flops_per_token=flops_per_token, decode=decode, stage=stage)
  candidates = topology_candidates(request.topology, request.num_slices)
  if len(candidates) > 1:
    return smallest_fit(request, candidates, **kw)
  return _compile_for(candidates[0], request.save_to, devices=devices, **kw)


def _compile_for(topo: Topology, save_to, *, cfg, mesh_cfg, optimizer, objective, make_step,
                 batch_size, seq_len, grad_accum_steps, model_cls, flops_per_token, decode,
                 stage, devices=None) -> dict:
  """compile_train_step for one concrete topology."""
  mesh = topology_mesh(mesh_cfg, topo, devices)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps, seq_len=seq_len)
  graphdef, abstract, specs, state_bytes = _state_bytes(cfg, optimizer, mesh, model_cls)
  shardings = train_state.to_shardings(specs, mesh)
  batch = abstract_batch(objective.batch_axes, mesh, batch_size, seq_len)
  batch_bytes = train_state.bytes_per_device(
      batch, {k: v.sharding.spec for k, v in batch.items()}, dict(mesh.shape))
  chip = topo.chip
  report = {"topology": topo.name, "topology_name": topo.topology_name, "chips": topo.chips,
            "num_slices": topo.num_slices, "mesh": dict(mesh.shape), "stage": stage,
            "params_bytes": state_bytes["params"], "opt_state_bytes": state_bytes["opt_state"],
            "batch_bytes": batch_bytes, "batch_keys": sorted(batch), "hbm_bytes": chip.hbm_bytes,
            "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth}
  print(f"compile for          {topo.name} ({topo.topology_name}, {topo.chips} chips"
        f"{f', {topo.num_slices} slices' if topo.num_slices > 1 else ''}; "
        f"HBM {_gib(chip.hbm_bytes)} a chip)\n"
        f"mesh                 {' '.join(f'{k}={v}' for k, v in mesh.shape.items())}\n"
        f"batch                {batch_size} x {seq_len} tokens ({grad_accum_steps} "
        f"micro-batch{'es' if grad_accum_steps > 1 else ''}); attention_impl "
        f"{cfg.attention_impl}, moe_impl {cfg.moe_impl}", flush=True)
  overflow = _state_overflow(state_bytes, chip)
  if overflow:
    # Not worth minutes of compiling: the float32 state alone overflows the chip.
    state_total = sum(state_bytes.values())
    report.update(fits=False, compiled=False, total_bytes=state_total,
                  margin_bytes=chip.hbm_bytes - state_total)
    print(f"does NOT fit         {overflow}; not compiled. Use more chips (a larger topology) "
          f"or more fsdp / expert sharding.", flush=True)
    return report
  from coder_jax.train.loop import jit_step
  state_args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  jitted = jit_step(make_step(graphdef), shardings, mesh)
  compiled, oom, report["compile_s"] = _compile(lambda: jitted.lower(state_args, batch), mesh)
  if compiled is None:
    report.update(fits=False, compiled=False, compiler_message=oom)
    print(f"does NOT fit         the TPU compiler ran out of HBM ({report['compile_s']:.0f} s): "
          f"{oom}", flush=True)
    return report
  report.update(_memory(compiled, state_args, batch, chip))
  report["mosaic_kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  model_flops = (flops_per_token * batch_size * seq_len / topo.chips if flops_per_token
                 else None)
  report.update(_roofline(compiled, model_flops, chip))
  print(_format(report), flush=True)
  if decode:
    report["decode"] = compile_decode(cfg, mesh, graphdef, chip, **decode)
  if save_to:
    save_executable(compiled, save_to)
    report["saved_to"] = save_to
    print(f"saved                the serialized executable to {save_to}", flush=True)
  return report


def _state_overflow(state_bytes: dict, chip: Chip, grads: bool = False) -> str | None:
  """Why the float32 state (with grads, also a gradient of the parameters' size, which the
  step holds whole: the global-norm clip reads it all before any update) overflows the chip;
  None where it does not."""
  total = sum(state_bytes.values()) + (state_bytes["params"] if grads else 0)
  if total <= chip.hbm_bytes:
    return None
  gradients = f" + gradients {_gib(state_bytes['params'])}" if grads else ""
  return (f"parameters {_gib(state_bytes['params'])} + optimizer state "
          f"{_gib(state_bytes['opt_state'])}{gradients} = {_gib(total)} per chip already exceed "
          f"the {_gib(chip.hbm_bytes)} of HBM (short by {_gib(total - chip.hbm_bytes)})")


def smallest_fit(request: CompileRequest, candidates: list[Topology], **kw) -> dict:
  """Compile for the candidates in order until one fits (the sampler too, where the stage has
  one). A size the mesh or the batch cannot divide over, or whose float32 parameters, optimizer
  state and gradients (--dry_run's count, no libtpu needed) overflow the chip, is skipped
  without compiling."""
  cfg, mesh_cfg = kw["cfg"], kw["mesh_cfg"]
  name = request.topology
  print(f"search               {name}: {candidates[0].name} .. {candidates[-1].name}, the "
        "first that fits", flush=True)
  tried: list[dict] = []
  for topo in candidates:
    try:
      mesh_sizes(mesh_cfg, topo)
      mesh = abstract_mesh(mesh_cfg, topo.chips)
      check_fit(mesh, cfg, batch_size=kw["batch_size"], grad_accum_steps=kw["grad_accum_steps"],
                seq_len=kw["seq_len"])
    except (TopologyError, MeshError) as e:
      tried.append({"topology": topo.name, "outcome": "skipped", "reason": str(e)})
      print(f"  {topo.name:<18} skipped: {e}", flush=True)
      continue
    *_, state_bytes = _state_bytes(cfg, kw["optimizer"], mesh, kw["model_cls"])
    reason = _state_overflow(state_bytes, topo.chip, grads=True)
    if reason:
      tried.append({"topology": topo.name, "outcome": "skipped", "reason": reason})
      print(f"  {topo.name:<18} skipped: {reason}", flush=True)
      continue
    print(f"  {topo.name:<18} compiling", flush=True)
    report = _compile_for(topo, request.save_to, **kw)
    fits = report["fits"] and report.get("decode", {}).get("fits", True)
    tried.append({"topology": topo.name, "outcome": "fits" if fits else "does not fit",
                  **{k: report[k] for k in ("total_bytes", "compiler_message") if k in report}})
    if fits:
      print(f"smallest that fits   {topo.name} ({topo.chips} chips)", flush=True)
      return {**report, "search": tried}
  print(f"does NOT fit         on any {name} slice up to {candidates[-1].name}", flush=True)
  return {"topology": name, "fits": False, "compiled": False, "search": tried}


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


def _memory(compiled, state_args, batch_args, chip: Chip) -> dict:
  """Per-device bytes by category from XLA's memory analysis. The arguments split into the
  train state and the batch by their compiled layouts (tile padding included); the donated
  state's outputs alias its arguments, so outputs count what is new (metrics)."""
  m = compiled.memory_analysis()
  total = _total(m)
  formats = jax.tree.leaves(compiled.input_formats[0])
  leaves = jax.tree_util.tree_flatten_with_path((state_args, batch_args))[0]
  # Leaves flatten in sorted key order; group them by the top-level key they come from.
  by_key: dict = {}
  for (path, a), f in zip(leaves, formats):
    key = "batch" if path[0].idx == 1 else path[1].key
    n = padded_bytes(a.sharding.shard_shape(a.shape), a.dtype, getattr(f, "layout", None))
    by_key[key] = by_key.get(key, 0) + n
  other = sum(n for k, n in by_key.items() if k not in ("params", "opt_state", "batch"))
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
          "code_bytes": m.generated_code_size_in_bytes,
          "compiled_params_bytes": by_key.get("params", 0),
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
  compute_s = max(flops, model_flops or 0.0) / chip.peak_flops
  memory_s = nbytes / chip.hbm_bandwidth
  t = max(compute_s, memory_s)
  out = {"xla_flops": flops, "xla_bytes": nbytes, "model_flops": model_flops,
         "roofline_s": t, "bound": "compute" if compute_s >= memory_s else "memory"}
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
                   max_new_tokens: int, group: int = 1) -> dict:
  """Compile the sampler as GRPO runs it on the training mesh (decode/generate.py
  generate_ids): prefill (once per run of `group` identical prompts) + the decode loop over the
  latent cache, the policy cast to the compute dtype, rows padded to whole runs and shards."""
  from coder_jax.decode.generate import _generate, sampler_rows
  _, abstract_state = train_state.abstract_model(cfg)
  specs = train_state.param_specs(abstract_state, mesh)
  dt = jnp.dtype(cfg.dtype)
  params = jax.tree.map(lambda a, s: _sds(a.shape, dt, mesh, s),
                        train_state.abstract_params(abstract_state), specs,
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  nnx.replace_by_pure_dict(abstract_state, params)
  rows, group = sampler_rows(rows, group, math.prod(mesh.shape[a] for a in
                                                    ("data", "fsdp", "expert")))
  key = jax.eval_shape(lambda: jax.random.key(0))
  scalar = lambda dtype: _sds((), dtype, mesh)
  args = (graphdef, abstract_state,
          _sds((rows, prompt_len), jnp.int32, mesh,
               logical_to_spec(("batch", None), (rows, prompt_len), mesh)),
          _sds((rows,), jnp.int32, mesh, logical_to_spec(("batch",), (rows,), mesh)),
          _sds(key.shape, key.dtype, mesh), scalar(jnp.float32), scalar(jnp.int32),
          scalar(jnp.float32), scalar(jnp.int32), _sds((1, 1), jnp.int32, mesh),
          _sds((1,), jnp.bool_, mesh))
  compiled, oom, seconds = _compile(lambda: _generate.lower(
      *args, max_new_tokens=max_new_tokens, attend="auto", group=group), mesh)
  out = {"rows": rows, "group": group, "prompt_len": prompt_len,
         "max_new_tokens": max_new_tokens, "compile_s": seconds}
  head = (f"sampler              {rows} rows x ({prompt_len} prompt + {max_new_tokens} new) "
          f"tokens, one prefill per {group} row{'s' if group > 1 else ''}, compiled in "
          f"{seconds:.1f} s")
  if compiled is None:
    out.update(fits=False, compiled=False, compiler_message=oom)
    print(f"{head}: does NOT fit, the TPU compiler ran out of HBM: {oom}", flush=True)
    return out
  m = compiled.memory_analysis()
  flops, nbytes = _cost(compiled)
  out.update(argument_bytes=m.argument_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
             output_bytes=m.output_size_in_bytes, total_bytes=_total(m),
             fits=_total(m) <= chip.hbm_bytes, compiled=True, xla_flops=flops, xla_bytes=nbytes,
             mosaic_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))
  print(f"{head}: weights {_gib(m.argument_size_in_bytes)} + temporaries (latent cache, "
        f"activations) {_gib(m.temp_size_in_bytes)} + outputs {_gib(m.output_size_in_bytes)} = "
        f"{_gib(out['total_bytes'])} per device: {'fits' if out['fits'] else 'does NOT fit'}",
        flush=True)
  return out


def save_executable(compiled, path: str):
  """The serialized executable and its argument / result trees (jax's serialize_executable),
  pickled: load with `pickle.load` and `deserialize_and_load` on the topology's devices."""
  from jax.experimental.serialize_executable import serialize
  payload, in_tree, out_tree = serialize(compiled)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree}, f)
