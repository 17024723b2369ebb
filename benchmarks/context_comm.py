"""Bytes one MLA layer communicates under context parallelism: the latent gather beside an
all-gather of expanded per-head keys and values (what ring attention over K/V moves per pass).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        .venv/bin/python benchmarks/context_comm.py [--context 8] [--lengths 32768,131072]

For Lite and 236B widths (bfloat16, one row, context = 8 fake CPU devices, tensor 1) it
compiles one attention layer's forward + backward with model/context.py's context_attention
(communicate="latent", the model's path, and "kv", the baseline), reads every collective of
the compiled program and prints bytes per device per layer: all-gather out x (n-1)/n,
reduce-scatter out x (n-1), all-reduce 2 x (n-1)/n, collective-permute its size (each over its
group; floating elements at 2 bytes, as bf16 on TPU / GPU: XLA:CPU widens them to f32; the
segment ids' int32 gather is included; the backward is taken for the layer's input only, so
the parameter gradients' sum over `context`, the same in both programs, is left out). Nothing runs:
compiling is enough, so 128K fits on a laptop. The "computed" columns are the formula
tokens x values x 2 bytes x (n-1)/n for the forward gather (the backward's reduce-scatter of
the gradient moves the same again).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from coder_jax.model import context  # noqa: E402
from coder_jax.model.attention import MLAttention, get_attention_impl  # noqa: E402
from coder_jax.model.config import get_config  # noqa: E402
from coder_jax.model.info import latent_values_per_token  # noqa: E402
from coder_jax.model.layers import dtype_of  # noqa: E402
from coder_jax.model.rope import rope_tables  # noqa: E402
from coder_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402

_OPS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


def _group_size(line: str, default: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)        # iota form [groups, size]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)          # explicit first group
  return len(m.group(1).split(",")) if m else default


def collective_bytes(hlo: str, n: int, elem_bytes: int = 2) -> dict[str, float]:
  """Bytes each device sends or receives per collective kind (ring formulas over each op's
  group). Elements count elem_bytes each: XLA:CPU widens bf16 collectives to f32, which a
  TPU / GPU program keeps in bf16; integer ones count 4."""
  out = {op: 0.0 for op in _OPS}
  pat = re.compile(r"= \(?([^=]*?)\)? (" + "|".join(_OPS) + r")(-start)?\(.*")
  for m in pat.finditer(hlo):
    g = _group_size(m.group(0), n)
    if g == 1:
      continue
    size = 0
    for dt, dims in re.findall(r"(bf16|f16|f32|s32|u32|pred|s8|u8)\[([\d,]*)\]", m.group(1)):
      k = 4 if dt in ("s32", "u32") else elem_bytes if dt in ("bf16", "f16", "f32") else 1
      for d in filter(None, dims.split(",")):
        k *= int(d)
      size += k
    factor = {"all-gather": (g - 1) / g, "reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / g,
              "collective-permute": 1, "all-to-all": (g - 1) / g}[m.group(2)]
    out[m.group(2)] += size * factor
  return out


def layer_program(cfg, seq_len: int, mesh, communicate: str) -> str:
  """Compiled HLO text of one MLA layer's forward + backward (input gradient) on the context
  mesh."""
  attn_def, state = nnx.split(nnx.eval_shape(lambda: MLAttention(cfg, rngs=nnx.Rngs(0))))
  dt = dtype_of(cfg.dtype)

  def loss(state, x, positions, seg):
    attn = nnx.merge(attn_def, state)
    cos, sin = rope_tables(cfg, positions)
    q = attn.queries(x, cos, sin)
    latent, k_rope = attn.latents(x, cos, sin)
    out = context.context_attention(cfg, q, latent, k_rope, seg, attn.kv_b_proj[...].astype(dt),
                                    get_attention_impl("reference"), communicate=communicate)
    return jnp.einsum("bthv,hvd->btd", out, attn.o_proj[...].astype(dt)).astype(jnp.float32).sum()

  tok = NamedSharding(mesh, P(None, "context"))
  args = (jax.ShapeDtypeStruct((1, seq_len, cfg.hidden_size), dt,
                               sharding=NamedSharding(mesh, P(None, "context", None))),
          jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=tok),
          jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=tok))
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(loss, argnums=1))   # parameter gradients' sums: the same in both
    return fn.lower(state, *args).compile().as_text()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--context", type=int, default=8)
  ap.add_argument("--lengths", default="32768,131072")
  ap.add_argument("--presets", default="coder_v2_lite,coder_v2")
  a = ap.parse_args()
  n = a.context
  mesh = make_mesh(MeshConfig(context=n, fsdp=jax.device_count() // n))
  print(f"jax {jax.__version__}, {jax.device_count()} fake CPU devices, context={n}, bf16, "
        "one row, one layer forward + backward; MB = 1e6 bytes per device")
  print("| model | tokens | latent gather (compiled) | expanded K/V gather (compiled) | ratio | "
        "latent (computed, fwd) | K/V (computed, fwd) | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for preset in a.presets.split(","):
    cfg = get_config(preset, num_hidden_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    h = cfg.num_attention_heads
    lat_vals = latent_values_per_token(cfg)
    kv_vals = h * (cfg.qk_head_dim + cfg.v_head_dim)
    for s in (int(x) for x in a.lengths.split(",")):
      t0 = time.perf_counter()
      got = {}
      for mode in ("latent", "kv"):
        b = collective_bytes(layer_program(cfg, s, mesh, mode), n)
        got[mode] = sum(b.values())
      secs = time.perf_counter() - t0
      comp = lambda vals: s * vals * 2 * (n - 1) / n / 1e6
      print(f"| {preset} | {s // 1024}K | {got['latent'] / 1e6:,.1f} MB | {got['kv'] / 1e6:,.1f} MB"
            f" | {got['kv'] / got['latent']:.1f}x | {comp(lat_vals):,.1f} MB | "
            f"{comp(kv_vals):,.1f} MB | {secs:.0f} |", flush=True)


if __name__ == "__main__":
  main()
