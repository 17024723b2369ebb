"""Decode speed with the latent KV cache, beside the HBM-bandwidth floor, in one table.

    python benchmarks/decode.py                  # CPU: the tiny model at batch 1 and 64
    python benchmarks/decode.py --lite_proxy     # accelerator: also the Lite-width proxy

Each row: a prefilled cache of --context tokens per row, then --steps greedy single-token steps
(embedding, all layers with absorbed MLA over the latent cache, LM head, the greedy token (sampling.first_max), cache write)
in one jitted fori_loop (the cache written in place); tokens/s = batch x steps / median time of 3 runs after a warm-up.
Floor: the bytes one step must read from memory (the weights it touches: every non-expert
weight, the LM head and embedding row gather counted as the full head, and the routed experts
a batch of that size touches in expectation under uniform routing, E(1 - (1 - k/E)^B) per MoE
layer; plus the latent cache up to the current position) over the device's measured copy
bandwidth (a 1 GiB array copy, read + write). "of floor" = floor time / measured time: 100% is
bandwidth-bound perfection. On CPU the same arithmetic runs against the host's copy bandwidth.
Lite proxy = DeepSeek-Coder-V2-Lite's widths (benchmarks/train_step.py) with --proxy_layers
layers, bf16 weights and cache. Imports only jax, flax, numpy (and gin via the configs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from host import cpu_model  # noqa: E402


def copy_bandwidth(nbytes=1 << 30) -> float:
  """Bytes/s of a device array copy (read + write)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return 2 * nbytes / statistics.median(times)


def step_bytes(cfg, batch: int, context: int) -> float:
  """Weights a decode step reads (experts: expected distinct per layer) + the latent cache."""
  from coder_jax.model.info import kv_cache_bytes_per_token, param_counts
  c = param_counts(cfg)
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  n_moe = sum(k == "moe" for k in cfg.layer_kinds())
  per_expert = c["routed_experts"] // (cfg.n_routed_experts * n_moe) if n_moe else 0
  e, k = cfg.n_routed_experts or 1, cfg.num_experts_per_tok or 0
  touched = e * (1 - (1 - k / e) ** batch) if n_moe else 0
  weights = (c["total"] - c["routed_experts"] + n_moe * touched * per_expert) * itemsize
  cache = batch * context * kv_cache_bytes_per_token(cfg, jnp.dtype(cfg.dtype).itemsize)
  return weights + cache


def run_row(name, cfg, batch, context, steps, attention_impl, bandwidth):
  from coder_jax.decode.attention import get_decode_attention
  from coder_jax.decode.generate import _decode_step, decode_layers, prefill
  from coder_jax.decode.sampling import first_max
  from coder_jax.model import init_model
  model = init_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  attend = get_decode_attention(attention_impl)
  prompt = jnp.ones((batch, context), jnp.int32)
  lengths = jnp.full((batch,), context, jnp.int32)

  @jax.jit
  def setup(state):
    return prefill(nnx.merge(graphdef, state), prompt, lengths, context + steps)

  @jax.jit
  def loop(state, logits, cache):
    m = nnx.merge(graphdef, state)
    layers = decode_layers(m)    # as generate_ids takes them: once, before the loop

    def body(i, carry):
      logits, cache = carry
      tok = first_max(logits)
      return _decode_step(m, cache, tok, lengths + i, attend, layers)
    return jax.lax.fori_loop(0, steps, body, (logits, cache))

  logits, cache = jax.block_until_ready(setup(state))
  t0 = time.perf_counter()
  jax.block_until_ready(loop(state, logits, cache))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(state, logits, cache))
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times) / steps
  floor = step_bytes(cfg, batch, context + steps // 2) / bandwidth
  print(f"| {name} | {attention_impl} | {batch} | {context} | {sec * 1e3:,.2f} | "
        f"{batch / sec:,.0f} | {floor * 1e3:,.3f} | {100 * floor / sec:.1f}% | {compile_s:.1f} |",
        flush=True)


def main(argv=None):
  import jaxlib
  from coder_jax.model import get_config
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lite_proxy", action="store_true")
  ap.add_argument("--proxy_layers", type=int, default=4)
  ap.add_argument("--context", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--batches", default="1,64")
  ap.add_argument("--attention_impls", default="auto")
  args = ap.parse_args(argv)
  bw = copy_bandwidth(1 << 28 if jax.default_backend() == "cpu" else 1 << 30)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  kind = cpu_model() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
  print(f"{now}; {kind} ({jax.default_backend()}, {jax.device_count()} devices, "
        f"{os.cpu_count()} CPUs); jax {jax.__version__}"
        f", jaxlib {jaxlib.__version__}; measured copy bandwidth {bw / 1e9:,.1f} GB/s\n")
  print("| model | attention | batch | context | ms/step | tokens/s | floor ms | of floor | "
        "compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  batches = [int(b) for b in args.batches.split(",")]
  cases = [("tiny", get_config("tiny", moe_impl="tiled"), min(args.context, 256))]
  if args.lite_proxy:
    from train_step import lite_proxy_config
    lite = lite_proxy_config(args.proxy_layers, "auto", remat="none", param_dtype="bfloat16")
    cases.append((f"Lite proxy {args.proxy_layers}L", lite, args.context))
  for name, cfg, context in cases:
    for impl in args.attention_impls.split(","):
      for b in batches:
        run_row(name, cfg, b, context, args.steps, impl, bw)


if __name__ == "__main__":
  main()
