"""Train-step speed of the pretraining step (`coder_jax.train.step`) in one table.

    python benchmarks/train_step.py                 # CPU: the tiny model
    python benchmarks/train_step.py --lite_proxy    # accelerator: also the Lite-width proxy

Each row: the full train step (forward, balance losses, backward, clip, AdamW; float32 master
weights, bf16 compute unless noted) jitted on one device, synthetic packed rows, median of
--steps timed steps after two warm-up steps. MFU counts 6 x active parameters + causal MLA
attention per token (coder_jax.train.flops) against the device's bf16 dense peak (989 TFLOP/s
for H100/H200); on CPU the peak is unknown and MFU is left out.
Lite proxy = DeepSeek-Coder-V2-Lite's widths (hidden 2048, 16 heads, kv_lora 512, 64 routed +
2 shared experts top-6, moe ff 1408, dense ff 10944, vocab 102400) with --proxy_layers layers
(1 dense + the rest MoE) at seq 4096, with the XLA paths (reference attention; the MoE by
lax.ragged_dot or the tiled scan).
Imports only jax, flax, optax, orbax, numpy and gin (runs where TensorFlow is absent).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax
import numpy as np


def run_case(name, cfg, batch, seq_len, steps):
  from coder_jax.parallel.mesh import MeshConfig, make_mesh
  from coder_jax.train.data import SyntheticData
  from coder_jax.train.flops import peak_flops_per_device, train_flops_per_token
  from coder_jax.train.optim import OptimizerConfig, make_optimizer
  from coder_jax.train.state import init_state
  from coder_jax.train.step import make_train_step
  mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
  opt, sched = make_optimizer(OptimizerConfig(warmup_steps=10), 1000)
  with jax.set_mesh(mesh):
    graphdef, state, shardings = init_state(cfg, opt, mesh, seed=0)
    step = jax.jit(make_train_step(graphdef, cfg, opt, sched), donate_argnums=0)
    stream = SyntheticData().open(model_vocab=cfg.vocab_size, batch_rows=batch, seq_len=seq_len,
                                  shard=0, num_shards=1, start_batch=0)
    batches = [jax.device_put(next(stream)) for _ in range(2)]
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    state, m = step(state, batches[1])
    jax.block_until_ready(m["loss"])
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      state, m = step(state, batches[i % 2])
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
    # The timed steps reuse two batches; the loss on an unseen one shows nothing leaks.
    unseen = SyntheticData(seed=1).open(model_vocab=cfg.vocab_size, batch_rows=batch,
                                        seq_len=seq_len, shard=0, num_shards=1, start_batch=0)
    _, m_unseen = step(state, jax.device_put(next(unseen)))
  dt = statistics.median(times)
  tokens = batch * seq_len
  flops = train_flops_per_token(cfg, seq_len) * tokens / dt
  peak = peak_flops_per_device()
  return {"case": name, "moe_impl": cfg.moe_impl, "dtype": cfg.dtype, "batch": batch,
          "seq_len": seq_len, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt,
          "tflops": flops / 1e12, "mfu": flops / peak if peak else None,
          "compile_s": compile_s, "loss": float(m["loss"]),
          "unseen_loss": float(m_unseen["ce_loss"])}


def lite_proxy_config(layers, moe_impl, remat="save_attention_out", **overrides):
  """The Lite-width proxy (see the module docstring) with `layers` layers, bf16 compute."""
  from coder_jax.model.config import get_config
  return get_config("coder_v2_lite", num_hidden_layers=layers, dtype="bfloat16",
                    moe_impl=moe_impl, remat_policy=remat, **overrides)


def main(argv=None):
  from coder_jax.model.config import get_config
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lite_proxy", action="store_true")
  ap.add_argument("--proxy_layers", type=int, default=4)
  ap.add_argument("--proxy_batch", type=int, default=2)
  ap.add_argument("--ragged_batch", type=int, default=1,
                  help="batch of the ragged_dot row (its XLA lowering needs far more memory)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--moe_impls", default="ragged,tiled")
  ap.add_argument("--remat", default="save_attention_out")
  args = ap.parse_args(argv)
  cases = [("tiny", get_config("tiny", moe_impl="tiled"), 8, 256),
           ("tiny", get_config("tiny", moe_impl="tiled", dtype="bfloat16"), 8, 256)]
  if args.lite_proxy:
    for impl in args.moe_impls.split(","):
      cfg = lite_proxy_config(args.proxy_layers, impl, args.remat)
      b = args.ragged_batch if impl == "ragged" else args.proxy_batch
      cases.append((f"Lite proxy {args.proxy_layers}L", cfg, b, 4096))
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
        f"python {platform.python_version()}")
  print("| case | moe_impl | compute | batch x seq | step ms | tokens/s | model TFLOP/s | MFU | "
        "compile s | loss | unseen-batch CE |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, cfg, b, t in cases:
    try:
      r = run_case(name, cfg, b, t, args.steps)
    except Exception as e:  # e.g. out of memory: report and go on
      print(f"| {name} | {cfg.moe_impl} | {cfg.dtype} | {b} x {t} | failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0][:120]} ||||||||")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {name} | {r['moe_impl']} | {r['dtype']} | {b} x {t} | {r['step_ms']:,.1f} | "
          f"{r['tokens_per_s']:,.0f} | {r['tflops']:,.2f} | {mfu} | {r['compile_s']:.1f} | "
          f"{r['loss']:.3f} | {r['unseen_loss']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
