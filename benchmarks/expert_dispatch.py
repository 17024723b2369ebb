"""Expert-parallel dispatch: drop fractions of the two capacity rules, and bytes / FLOPs per MoE
layer of the dropless paths.

  python benchmarks/expert_dispatch.py capacity     # ~1 min on 2 cores: 8 fake CPU devices
  python benchmarks/expert_dispatch.py tpu          # compiles for v5p-16 and v5p-128 (libtpu);
                                                    # ~3 min a program on 2 shared cores

`capacity` routes Lite-shaped tokens (64 experts, top-6, 8 expert-parallel devices, 512 tokens a
device) through `experts_forward` under `token_dropping()` with capacity_rule "pair" and "device"
(no guarded rows) and prints the fraction of copies dropped, the mean of 3 routings. Router
logits N(0, 1) plus a per-expert bias N(0, skew^2): "per-device" draws one bias per sending
device (each device's sequences prefer their own experts, e.g. one programming language a
device), "global" one for all tokens (experts popular everywhere: over-loaded receivers, which
no capacity rule helps and the balance losses fix).

`tpu` compiles one Lite MoE layer's routed experts, forward + backward, bf16, 4096 tokens a chip,
`moe_impl="ragged"`, for expert = P chips of a v5p topology, through all_to_all with buffers
for every copy from every peer (dispatch_headroom=None: today's buffers), all_to_all with
headroom 2 (the XLA:CPU path) and ragged_all_to_all with headroom 2 (TPU / GPU), and prints XLA's memory and cost analysis next to the formulas. XLA's
FLOP count for lax.ragged_dot is that of a dense product over all local experts, so FLOPs are
also given from the rows the experts compute: rows x 6 D F x 3 (forward and two backward
matmuls).
"""

from __future__ import annotations

import functools
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from coder_jax.model import get_config, get_moe_impl, route  # noqa: E402
from coder_jax.parallel import expert  # noqa: E402
from coder_jax.parallel.expert import experts_forward, token_dropping  # noqa: E402
from coder_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402

D, F, E, K, TOKENS = 2048, 1408, 64, 6, 4096      # Lite widths; tokens a chip (one 4K row)


@functools.lru_cache(maxsize=None)
def _kept_fn(rule: str, c: float, d: int):
  cfg = get_config("coder_v2_lite", hidden_size=d, moe_intermediate_size=d, capacity_factor=c,
                   capacity_rule=rule, capacity_guard_fraction=0.0, moe_impl="ragged")
  with token_dropping():   # read at trace time: trace now
    return cfg, jax.jit(lambda *a: experts_forward(cfg, *a, impl=get_moe_impl("ragged"),
                                                   dtype=jnp.float32, return_kept=True)[1])


def drop_fraction(rule: str, c: float, skew: float, per_device: bool, *, p: int = 8,
                  n_local: int = 512, seed: int = 0) -> float:
  """Fraction of token copies dropped (no guarded rows) for one random routing."""
  rng = np.random.default_rng(seed)
  n, d = p * n_local, 8
  cfg, fn = _kept_fn(rule, c, d)
  bias = rng.normal(size=(p if per_device else 1, 1, E)) * skew
  logits = (rng.normal(size=(p, n_local, E)) + bias).reshape(n, E)
  r = route(jnp.asarray(logits, jnp.float32), cfg)
  aff = jnp.take_along_axis(r.scores_NE, r.experts_NK, axis=-1)
  w = jnp.zeros((E, d, d), jnp.float32)
  with jax.set_mesh(make_mesh(MeshConfig(expert=p))), token_dropping():
    kept = np.asarray(fn(jnp.zeros((n, d)), r.experts_NK, r.weights_NK, aff, w, w, w))
  return float(1.0 - kept.mean())


def capacity_table():
  print("| routing | c | pair rule dropped | device rule dropped |")
  print("|---|---|---|---|")
  for skew, per_device in ((0.0, False), (0.5, True), (1.0, True), (0.5, False), (1.0, False)):
    name = ("balanced" if not skew else
            f"{'per-device' if per_device else 'global'} skew {skew}")
    for c in (1.0, 1.25):
      pair, dev = (np.mean([drop_fraction(rule, c, skew, per_device, seed=s) for s in range(3)])
                   for rule in ("pair", "device"))
      print(f"| {name} | {c} | {pair:.2%} | {dev:.2%} |", flush=True)


def compile_layer(p: int, topology: str, *, ragged: bool, headroom, rule: str | None = None):
  """(temp bytes, XLA flops, XLA bytes accessed, compile s) of the layer on the topology;
  rule: compiled under token_dropping() with capacity_factor 1 and that capacity rule."""
  from jax.sharding import NamedSharding
  from coder_jax.parallel.rules import logical_to_spec
  from coder_jax.train import aot
  expert.ragged_platform = lambda: ragged
  mesh = aot.topology_mesh(MeshConfig(expert=p), aot.parse_topology(topology))
  cap = dict(capacity_factor=1.0, capacity_rule=rule, capacity_guard_fraction=0.0) if rule else {}
  cfg = get_config("coder_v2_lite", moe_impl="ragged", dispatch_headroom=headroom, **cap)
  n = TOKENS * p

  def sds(shape, dt, axes):
    return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(
        mesh, logical_to_spec(axes, shape, mesh)))

  tok = ("batch", None)
  args = [sds((n, D), jnp.bfloat16, tok), sds((n, K), jnp.int32, tok),
          sds((n, K), jnp.float32, tok), sds((n, K), jnp.float32, tok),
          sds((E, D, F), jnp.bfloat16, ("experts", None, "expert_mlp")),
          sds((E, D, F), jnp.bfloat16, ("experts", None, "expert_mlp")),
          sds((E, F, D), jnp.bfloat16, ("experts", "expert_mlp", None))]

  def loss(x, ex, w, a, g, u, dn):
    y = experts_forward(cfg, x, ex, w, a, g, u, dn, impl=get_moe_impl("ragged"),
                        dtype=jnp.bfloat16)
    return y.astype(jnp.float32).sum()

  t0 = time.time()
  with jax.set_mesh(mesh), aot.no_persistent_cache(), token_dropping(rule is not None):
    c = jax.jit(jax.grad(loss, argnums=(0, 4, 5, 6))).lower(*args).compile()
  cost = c.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return (c.memory_analysis().temp_size_in_bytes, float(cost.get("flops", 0.0)),
          float(cost.get("bytes accessed", 0.0)), time.time() - t0)


def formulas(p: int, *, ragged: bool, headroom):
  """(rows computed in a round, bytes one device sends per all_to_all, expert TFLOP fwd+bwd)
  under balanced routing (one round)."""
  m = TOKENS * K
  if ragged:
    rows = p * m if headroom is None else min(p * m, int(np.ceil(headroom * m)))
    sent_rows = m                                       # only the copies themselves
  else:
    window = m if headroom is None else min(m, int(np.ceil(headroom * m / p)))
    rows = sent_rows = p * window                       # fixed [P, window] buffers
  return rows, sent_rows * D * 2, rows * 6 * D * F * 3 / 1e12


PATHS = (("all_to_all, worst-case buffers (today's)", False, None),
         ("all_to_all, headroom 2", False, 2.0),
         ("ragged_all_to_all, headroom 2", True, 2.0))


def tpu_table():
  print("| P | path | rows computed | sent per all_to_all (GiB) | expert TFLOP (formula) "
        "| XLA temporaries (GiB) | XLA TFLOP | XLA bytes accessed (GiB) | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for p, topo in ((8, "v5p-16"), (64, "v5p-128")):
    for name, ragged, head in PATHS:
      rows, sent, tflop = formulas(p, ragged=ragged, headroom=head)
      temp, flops, accessed, secs = compile_layer(p, topo, ragged=ragged, headroom=head)
      print(f"| {p} | {name} | {rows:,} | {sent / 2**30:.3f} | {tflop:.2f} | {temp / 2**30:.2f} "
            f"| {flops / 1e12:.1f} | {accessed / 2**30:.1f} | {secs:.0f} |", flush=True)
  print("\n| P = 8, ragged, c = 1 | XLA temporaries (GiB) | XLA bytes accessed (GiB) |")
  print("|---|---|---|")
  for rule in ("pair", "device"):
    temp, _, accessed, _ = compile_layer(8, "v5p-16", ragged=True, headroom=2.0, rule=rule)
    print(f"| {rule} rule | {temp / 2**30:.2f} | {accessed / 2**30:.1f} |", flush=True)


if __name__ == "__main__":
  what = sys.argv[1:] or ["capacity"]
  if "capacity" in what:
    capacity_table()
  if "tpu" in what:
    tpu_table()
