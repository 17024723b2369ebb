"""Kernel speed: our Pallas kernels beside XLA, cuDNN and tokamax, in side-by-side tables.

    python benchmarks/kernels.py                 # on an accelerator (H100): the full shapes
    python benchmarks/kernels.py --smoke         # CPU, tiny shapes: proves the script runs
    python benchmarks/kernels.py --only gmm --iters 50
    python benchmarks/kernels.py --tune          # also sweep our kernels' block sizes
    python benchmarks/kernels.py --only tune     # only the sweep; on a CPU: its H100 compile check

Attention: B2 T4096 H16 Dqk192 Dv128, causal, bf16; fwd, and fwd+bwd = grads of
sum(out * cotangent) w.r.t. q, k, v. Columns: ours (`pallas_kernels.mla_attention`, the
platform's backend), XLA (`backend="xla"`), cuDNN (`jax.nn.dot_product_attention`, v zero-padded
to Dqk, the pad counted in its time), tokamax (each implementation on this platform).
Grouped matmul: M49152 K2048 N1408 G64, bf16; balanced (M/G rows per group) and skewed (Zipf:
group g gets a share proportional to (rank+1)^-1.2, ranks shuffled with numpy seed 0, the
rounding remainder to the largest group; sizes sum to M); fwd, and fwd+bwd = grads w.r.t. lhs
and rhs. Columns: ours (`pallas_kernels.grouped_matmul`), XLA (`lax.ragged_dot`), tokamax
(`ragged_dot`, each implementation), ceiling (a balanced batched einsum [G, M/G, K] x [G, K, N],
the same FLOPs with no raggedness; it does not depend on the group sizes).
Train: the Lite proxy of benchmarks/train_step.py with attention_impl = moe_impl = "auto", and
the XLA paths (attention "xla", moe "tiled") and, where installed, tokamax for comparison; MFU
against the device's bf16 peak (coder_jax.train.flops: 989 TFLOP/s for H100).

FLOP conventions (TFLOP/s are model FLOPs over the median time, never the padded work):
  attention fwd = 2 * B * H * T(T+1)/2 * (Dqk + Dv)   (QK^T and PV on the causal triangle)
  attention fwd+bwd = 3.5 x fwd                       (bwd = 2.5 x fwd: recomputed scores, dV,
                                                        dP, dQ and dK)
  grouped matmul fwd = 2 * M * K * N, fwd+bwd = 3 x fwd (dlhs and drhs)
Timing: each callable jitted once, two warm-up calls, then the median of --iters calls, each
ended by jax.block_until_ready. "max|d| vs ref" is the largest absolute difference (bf16 outputs,
and for fwd+bwd all gradients) from an XLA reference on the same inputs: for attention the XLA
column's output; for the grouped matmul one dense dot per group with the sizes static (f32
accumulation), which, unlike lax.ragged_dot's GPU lowering, fits in memory at full size.
A failing column prints its error class and the run goes on; the messages follow the table.
--smoke runs ours with backend="xla" (interpret-mode Pallas is far too slow on CPU) and the train
row on the tiny model (2 layers, float32, "auto" only), so it checks only that the script works,
not the kernels or their speed.
Imports only jax, flax, optax, orbax, numpy and gin (tokamax when installed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "benchmarks")):
  if _p not in sys.path:
    sys.path.insert(0, _p)

from pallas_kernels import baselines  # noqa: E402

FULL = {"attention": dict(B=2, T=4096, H=16, Dqk=192, Dv=128),
        "gmm": dict(M=49152, K=2048, N=1408, G=64),
        "train": dict(layers=4, batch=2, seq=4096)}
SMOKE = {"attention": dict(B=1, T=64, H=2, Dqk=24, Dv=16),
         "gmm": dict(M=128, K=32, N=48, G=4),
         "train": dict(batch=1, seq=64)}
ZIPF_S = 1.2


class Failed:
  """A column that raised: shown as its error class, the message listed under the table."""

  def __init__(self, err):
    self.err = err

  def __str__(self):
    return f"failed: {type(self.err).__name__}"


def bench(fn, args, iters):
  """(median seconds, last output) of jit(fn)(*args)."""
  f = jax.jit(fn)
  for _ in range(2):  # compile, then one more so allocator and autotuning settle
    out = jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def max_abs_diff(a, b) -> float:
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in leaves)


def grads_of(fn, argnums):
  """fn's grads w.r.t. `argnums` of sum(fn(...) * ct), ct the last argument."""
  def g(*args):
    *xs, ct = args
    loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32) * ct.astype(jnp.float32))
    return jax.grad(loss, argnums=argnums)(*xs)
  return g


def fmt_time(r, flops):
  if isinstance(r, Failed):
    return str(r)
  return f"{r * 1e3:,.3f} ms, {flops / r / 1e12:,.3g} TFLOP/s"


def fmt_diff(d):
  return d if isinstance(d, str) else f"{d:.3g}"


def run_columns(columns, passes, iters, ref_fn=None):
  """columns: [(name, fn)]; passes: [(label, wrap, args)], wrap(fn) -> the timed callable.

  Returns {label: {name: seconds | Failed}} and {label: {name: max|d| vs ref | str}}. The ref is
  wrap(ref_fn)'s output (untimed) when ref_fn is given, else the "XLA" column's, which then runs
  first; either way each column's output is compared and dropped at once.
  """
  order = sorted(columns, key=lambda c: c[0] != "XLA")
  times, diffs = {}, {}
  for label, wrap, args in passes:
    times[label], diffs[label], ref = {}, {}, None
    if ref_fn is not None:
      try:
        ref = jax.block_until_ready(jax.jit(wrap(ref_fn))(*args))
      except Exception as e:  # no reference: the diffs read n/a
        print(f"- reference for {label} failed: {type(e).__name__}: {str(e)[:200]}")
    for name, fn in order:
      try:
        t, out = bench(wrap(fn), args, iters)
      except Exception as e:  # any failure: report it and go on with the next column
        times[label][name], diffs[label][name] = Failed(e), "-"
        continue
      times[label][name] = t
      if ref_fn is None and name == "XLA":
        ref, diffs[label][name] = out, "(ref)"
      else:
        diffs[label][name] = "n/a" if ref is None else max_abs_diff(out, ref)
      del out
  return times, diffs


def print_table(title, columns, rows, times, diffs, flops):
  names = [n for n, _ in columns]
  print(f"\n### {title}\n")
  print("| pass | " + " | ".join(names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for label in rows:
    print(f"| {label} | " + " | ".join(fmt_time(times[label][n], flops[label]) for n in names)
          + " |")
    print(f"| {label} max\\|d\\| vs ref | "
          + " | ".join(fmt_diff(diffs[label][n]) for n in names) + " |")
  errors = {}
  for label in rows:
    for n in names:
      r = times[label][n]
      if isinstance(r, Failed):
        first = (str(r.err).strip().splitlines() or [""])[0]
        errors.setdefault((n, f"{type(r.err).__name__}: {first}"), []).append(label)
  for (n, msg), labels in errors.items():
    print(f"- {n} ({', '.join(labels)}): {msg[:300]}")
  sys.stdout.flush()


def tokamax_columns(op, make):
  """[(name, fn)] for each tokamax implementation here, or one failing column saying why."""
  try:
    impls = baselines.tokamax_implementations(op)
  except ImportError as e:
    def missing(*_, err=e):
      raise err
    return [("tokamax", missing)]
  return [(f"tokamax {impl}", make(impl)) for impl in impls]


def attention_section(s, smoke, iters):
  import pallas_kernels as pk  # pylint: disable=import-outside-toplevel
  b, t, h, dqk, dv = s["B"], s["T"], s["H"], s["Dqk"], s["Dv"]
  ks = jax.random.split(jax.random.key(0), 4)
  q, k = (jax.random.normal(x, (b, t, h, dqk), jnp.bfloat16) for x in ks[:2])
  v, ct = (jax.random.normal(x, (b, t, h, dv), jnp.bfloat16) for x in ks[2:])
  scale = dqk ** -0.5
  ours_backend = "xla" if smoke else None

  def ours(q, k, v):
    return pk.mla_attention(q, k, v, causal=True, sm_scale=scale, backend=ours_backend)

  def xla(q, k, v):
    return pk.mla_attention(q, k, v, causal=True, sm_scale=scale, backend="xla")

  def cudnn(q, k, v):
    return baselines.cudnn_attention(q, k, v, causal=True, sm_scale=scale)

  def tk(impl):
    return lambda q, k, v: baselines.tokamax_attention(q, k, v, causal=True, sm_scale=scale,
                                                      implementation=impl)

  columns = [("ours", ours), ("XLA", xla), ("cuDNN (v padded)", cudnn)]
  columns += tokamax_columns("attention", tk)
  fwd = 2.0 * b * h * (t * (t + 1) / 2) * (dqk + dv)
  flops = {"fwd": fwd, "fwd+bwd": 3.5 * fwd}
  passes = [("fwd", lambda f: f, (q, k, v)),
            ("fwd+bwd", lambda f: grads_of(f, (0, 1, 2)), (q, k, v, ct))]
  times, diffs = run_columns(columns, passes, iters)
  print_table(f"Attention: B{b} T{t} H{h} Dqk{dqk} Dv{dv}, causal, bf16", columns,
              ["fwd", "fwd+bwd"], times, diffs, flops)


def skewed_sizes(m, g, s=ZIPF_S, seed=0):
  w = np.random.default_rng(seed).permutation(np.arange(1, g + 1, dtype=np.float64) ** -s)
  sizes = np.floor(w / w.sum() * m).astype(np.int64)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes.astype(np.int32)


def gmm_section(s, smoke, iters):
  import pallas_kernels as pk  # pylint: disable=import-outside-toplevel
  m, kd, n, g = s["M"], s["K"], s["N"], s["G"]
  ks = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(ks[0], (m, kd), jnp.bfloat16)
  # 1/sqrt(K) keeps outputs O(1), so the bf16 differences below read as relative.
  rhs = (jax.random.normal(ks[1], (g, kd, n), jnp.float32) * kd ** -0.5).astype(jnp.bfloat16)
  ct = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  ours_backend = "xla" if smoke else None
  dists = {"balanced": np.full(g, m // g, np.int32), "skewed": skewed_sizes(m, g)}
  sk = dists["skewed"]
  print(f"\nskewed group sizes: max {sk.max()}, median {int(np.median(sk))}, min {sk.min()} "
        f"(Zipf s={ZIPF_S}, seed 0)")

  def tk(impl):
    return lambda l, r, gs: baselines.tokamax_grouped_matmul(
        l, r, gs, implementation=impl, zero_unused_rows=False)

  def ceiling(l, r, gs):
    del gs  # the balanced batched product: no raggedness, the same FLOPs
    return jnp.einsum("gmk,gkn->gmn", l.reshape(g, m // g, kd), r).reshape(m, n)

  def per_group_ref(sizes):
    """Exact XLA reference with the sizes static: one dense dot per group, f32 accumulation.
    Unlike lax.ragged_dot it needs no dense [G, M, ...] buffers, so it fits at full size."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def ref(l, r, gs):
      del gs
      outs = [jnp.dot(l[a:b], r[i], preferred_element_type=jnp.float32)
              for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
      return jnp.concatenate(outs).astype(l.dtype)
    return ref

  ceil_name = "ceiling (batched einsum)"
  columns = [("ours", lambda l, r, gs: pk.grouped_matmul(l, r, gs, backend=ours_backend)),
             ("XLA", lambda l, r, gs: jax.lax.ragged_dot(l, r, gs))]
  columns += tokamax_columns("ragged_dot", tk) + [(ceil_name, ceiling)]
  fwd = 2.0 * m * kd * n
  rows, times, diffs, flops = [], {}, {}, {}
  for dist, sizes in dists.items():
    gs = jnp.asarray(sizes)
    passes = [(f"{dist} fwd", lambda f: f, (lhs, rhs, gs)),
              (f"{dist} fwd+bwd", lambda f: grads_of(f, (0, 1)), (lhs, rhs, gs, ct))]
    # The ceiling ignores the sizes: timed once, with the balanced rows (whose outputs it equals).
    t, d = run_columns(columns if dist == "balanced" else columns[:-1], passes, iters,
                       ref_fn=per_group_ref(sizes))
    for (label, _, _), fl in zip(passes, (fwd, 3 * fwd)):
      if dist != "balanced":
        t[label][ceil_name] = times[label.replace(dist, "balanced")][ceil_name]
        d[label][ceil_name] = "-"
      rows.append(label)
      flops[label] = fl
    times.update(t)
    diffs.update(d)
  print_table(f"Grouped matmul: M{m} K{kd} N{n} G{g}, bf16 (XLA = lax.ragged_dot)", columns,
              rows, times, diffs, flops)


def train_section(s, smoke, iters):
  import train_step  # pylint: disable=import-outside-toplevel
  from coder_jax.model.config import get_config  # pylint: disable=import-outside-toplevel
  # The XLA-paths row doubles the (CPU-bound) compile time, so a smoke run leaves it out.
  impls = [("auto", "auto")] if smoke else [("auto", "auto"), ("xla", "tiled")]
  if not smoke and baselines.tokamax_available():
    impls.append(("tokamax", "tokamax"))
  print("\n### Train step\n")
  print("| case | attention_impl | moe_impl | batch x seq | step ms | tokens/s | "
        "model TFLOP/s | MFU | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for attn, moe in impls:
    if smoke:
      name = "tiny"
      # 2 layers (1 dense + 1 MoE), float32: the quickest tiny step to compile on CPU.
      cfg_fn = lambda: get_config("tiny", num_hidden_layers=2, attention_impl=attn,
                                  moe_impl=moe)
    else:
      name = f"Lite proxy {s['layers']}L"
      cfg_fn = lambda: train_step.lite_proxy_config(s["layers"], moe, attention_impl=attn)
    b, t = s["batch"], s["seq"]
    try:
      r = train_step.run_case(name, cfg_fn(), b, t, iters)
    except Exception as e:  # e.g. "auto" not registered yet, out of memory: report, go on
      print(f"| {name} | {attn} | {moe} | {b} x {t} | failed: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''} |||||")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {name} | {attn} | {moe} | {b} x {t} | {r['step_ms']:,.1f} | "
          f"{r['tokens_per_s']:,.0f} | {r['tflops']:,.2f} | {mfu} | {r['compile_s']:.1f} |",
          flush=True)


# Candidate block sizes for --tune (the defaults in pallas_kernels are the first of each list).
# Attention fwd: (block_q, block_k, num_warps, num_stages); bwd: the same for both bwd kernels.
# The Triton lists hold only configurations that compile for H100 without spills at the tuning
# shapes (python -m pallas_kernels.compile_report; tests/test_kernels_compile_gpu.py keeps them
# so), and --tune re-checks them where that compile runs.
TUNE = {
    "triton": dict(
        attn_fwd=[(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                  (128, 32, 8, 3), (64, 64, 4, 2)],
        attn_bwd=[(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 3),
                  (32, 32, 8, 2)],
        gmm=[(128, 64, 128), (128, 32, 128), (128, 128, 128), (64, 64, 128), (64, 32, 128),
             (64, 64, 64)]),
    "tpu": dict(
        attn_fwd=[(512, 512, None, None), (256, 512, None, None), (1024, 512, None, None),
                  (128, 128, None, None)],
        attn_bwd=[(256, 512, None, None), (512, 512, None, None), (128, 256, None, None)],
        gmm=[(128, 512, 128), (256, 512, 256), (512, 1024, 128), (128, 2048, 128)]),
}


def attention_blocks(kind, cand, backend="triton"):
  """BlockSizes with a `kind` ("fwd" / "fwd+bwd") candidate and the default blocks elsewhere."""
  from pallas_kernels.attention import DEFAULT_BLOCKS, BlockSizes  # pylint: disable=import-outside-toplevel
  base = DEFAULT_BLOCKS[backend]
  bq, bk, w, st = cand
  if kind == "fwd":
    return BlockSizes(bq, bk, base.bwd_block_q, base.bwd_block_k, w, st, base.bwd_num_warps,
                      base.bwd_num_stages)
  return BlockSizes(base.block_q, base.block_k, bq, bk, base.num_warps, base.num_stages, w, st)


def triton_compile_cases(s):
  """{candidate list name: [(candidate, compile_report.Case)]} for TUNE's Triton candidates at
  the tuning shapes: fwd alone for attn_fwd, all three kernels for attn_bwd and gmm."""
  from pallas_kernels import compile_report as cr  # pylint: disable=import-outside-toplevel
  a, g = s["attention"], s["gmm"]
  attn = lambda cand, kind: cr.attention_case(
      a["B"], a["T"], a["H"], a["Dqk"], a["Dv"], segments=False, grad=kind != "fwd",
      block_sizes=attention_blocks(kind, cand))
  return {
      "attn_fwd": [(c, attn(c, "fwd")) for c in TUNE["triton"]["attn_fwd"]],
      "attn_bwd": [(c, attn(c, "fwd+bwd")) for c in TUNE["triton"]["attn_bwd"]],
      "gmm": [(c, cr.gmm_case(g["M"], g["K"], g["N"], g["G"], tiling=c))
              for c in TUNE["triton"]["gmm"]]}


def spill_free_candidates(s):
  """TUNE's Triton lists less the candidates whose H100 compile spills or overflows shared
  memory, with a table of what each compiled to; TUNE unchanged (and the reason) where the
  compile cannot run."""
  from pallas_kernels import compile_report as cr  # pylint: disable=import-outside-toplevel
  problem = cr.pairing_problem()
  if problem:
    print(f"\nH100 compile check skipped ({problem}); TUNE's Triton lists were spill-free "
          f"when last checked with jaxlib {cr.VERIFIED_PAIRING['jax']} and triton "
          f"{cr.VERIFIED_PAIRING['triton']}.")
    return dict(TUNE["triton"])
  print("\n### Tuning candidates compiled for H100 (sm_90a; pallas_kernels.compile_report)\n")
  print("| list | candidate | kernel | warps / stages | shared memory | registers | spills "
        "(stores / loads) | blocks / SM | timed |")
  print("|---|---|---|---|---|---|---|---|---|")
  keep, cache = {}, {}
  for name, cases in triton_compile_cases(s).items():
    keep[name] = []
    for cand, case in cases:
      try:
        res = cr.compile_case(case, cache)
      except Exception as e:  # a candidate the compiler rejects is not timed either
        print(f"| {name} | {cand} | failed: {type(e).__name__} ||||||no |", flush=True)
        continue
      ok = all(r.ok for r in res)
      if ok:
        keep[name].append(cand)
      for r in res:
        print(f"| {name} | {cand} | {r.name} | {r.num_warps} / {r.num_stages} | "
              f"{r.shared_bytes:,} B | {r.registers} | {r.spill_stores} / {r.spill_loads} B | "
              f"{r.blocks_per_sm} | {'yes' if ok else 'no'} |", flush=True)
  return keep


def tune_section(s, iters):
  """Time our kernels over TUNE's block sizes (the fwd+bwd rows keep the default forward);
  Triton candidates that spill on H100 are dropped first (the check needs no GPU)."""
  import pallas_kernels as pk  # pylint: disable=import-outside-toplevel
  backend = {"gpu": "triton", "tpu": "tpu"}.get(jax.default_backend())
  cands = TUNE[backend] if backend == "tpu" else None
  if backend in (None, "triton"):
    cands = spill_free_candidates(s)
  if backend is None:
    print("\n--tune times candidates on a GPU or TPU only; this machine ran the compile check.")
    return
  a = s["attention"]
  b, t, h, dqk, dv = a["B"], a["T"], a["H"], a["Dqk"], a["Dv"]
  ks = jax.random.split(jax.random.key(0), 4)
  q, k = (jax.random.normal(x, (b, t, h, dqk), jnp.bfloat16) for x in ks[:2])
  v, ct = (jax.random.normal(x, (b, t, h, dv), jnp.bfloat16) for x in ks[2:])
  fwd_flops = 2.0 * b * h * (t * (t + 1) / 2) * (dqk + dv)
  print(f"\n### Tuning ({backend}): attention B{b} T{t} H{h} {dqk}/{dv} causal bf16\n")
  print("| kernel | block_q, block_k, warps, stages | ms | TFLOP/s |")
  print("|---|---|---|---|")
  for kind, cfgs in (("fwd", cands["attn_fwd"]), ("fwd+bwd", cands["attn_bwd"])):
    for bq, bk, w, st in cfgs:
      bs = attention_blocks(kind, (bq, bk, w, st), backend)
      fn = lambda q, k, v, bs=bs: pk.mla_attention(q, k, v, block_sizes=bs)
      timed, args = (fn, (q, k, v)) if kind == "fwd" else (grads_of(fn, (0, 1, 2)), (q, k, v, ct))
      flops = fwd_flops if kind == "fwd" else 3.5 * fwd_flops
      try:
        sec, _ = bench(timed, args, iters)
        print(f"| {kind} | {bq}, {bk}, {w}, {st} | {sec * 1e3:.3f} | {flops / sec / 1e12:.1f} |",
              flush=True)
      except Exception as e:  # e.g. out of shared memory: report and go on
        print(f"| {kind} | {bq}, {bk}, {w}, {st} | failed: {type(e).__name__} | |", flush=True)
  g = s["gmm"]
  m, kd, n, groups = g["M"], g["K"], g["N"], g["G"]
  ks = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(ks[0], (m, kd), jnp.bfloat16)
  rhs = (jax.random.normal(ks[1], (groups, kd, n), jnp.float32) * kd ** -0.5).astype(jnp.bfloat16)
  dout = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  print(f"\n### Tuning ({backend}): grouped matmul M{m} K{kd} N{n} G{groups} bf16\n")
  print("| sizes | tm, tk, tn | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|---|---|")
  fl = 2.0 * m * kd * n
  for dist, sizes in (("balanced", np.full(groups, m // groups, np.int32)),
                      ("skewed", skewed_sizes(m, groups))):
    gs = jnp.asarray(sizes)
    for tiling in cands["gmm"]:
      fn = lambda l, r, gs, tiling=tiling: pk.grouped_matmul(l, r, gs, tiling=tiling)
      cells = []
      for timed, args, f in ((fn, (lhs, rhs, gs), fl),
                             (grads_of(fn, (0, 1)), (lhs, rhs, gs, dout), 3 * fl)):
        try:
          sec, _ = bench(timed, args, iters)
          cells += [f"{sec * 1e3:.3f}", f"{f / sec / 1e12:.1f}"]
        except Exception as e:  # report and go on
          cells += [f"failed: {type(e).__name__}", ""]
      print(f"| {dist} | {', '.join(map(str, tiling))} | " + " | ".join(cells) + " |", flush=True)


def header(smoke, iters):
  import jaxlib  # pylint: disable=import-outside-toplevel
  from coder_jax.train.flops import peak_flops_per_device  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  tk = baselines.tokamax_version() or "not installed"
  peak = peak_flops_per_device()
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(f"## Kernels (`benchmarks/kernels.py`{' --smoke' if smoke else ''})\n")
  print(f"{now}; device: {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s)); jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"python {platform.python_version()}; tokamax {tk}; bf16 peak "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}.")
  print(f"Kernels: median of {iters} calls after 2 warm-up calls; train: median of "
        f"{min(iters, 10)} steps after 2 (benchmarks/train_step.py's run_case).")
  if smoke:
    print("SMOKE RUN: tiny shapes, ours on backend='xla'; proves the script runs, not speed.")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes, ours on backend='xla' (CPU): only proves the script runs")
  ap.add_argument("--only", choices=("attention", "gmm", "train", "tune"),
                  help="one section; 'tune' runs only the block-size sweep (implies --tune)")
  ap.add_argument("--tune", action="store_true",
                  help="also time our kernels over candidate block sizes (GPU / TPU); Triton "
                       "candidates are first compiled for H100 and those that spill dropped, "
                       "a check that also runs on a CPU-only machine")
  ap.add_argument("--iters", type=int, default=None,
                  help="timed calls per cell (default 20; smoke 3); train steps: at most 10")
  args = ap.parse_args(argv)
  iters = args.iters or (3 if args.smoke else 20)
  shapes = SMOKE if args.smoke else FULL
  header(args.smoke, iters)
  sections = {"attention": attention_section, "gmm": gmm_section, "train": train_section}
  for name, fn in sections.items():
    if args.only in (None, name):
      fn(shapes[name], args.smoke, min(iters, 10) if name == "train" else iters)
  if (args.tune or args.only == "tune") and not args.smoke:
    tune_section(FULL, iters)


if __name__ == "__main__":
  main()
