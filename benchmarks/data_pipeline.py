"""Data pipeline throughput beside what a training step consumes, in one table.

    python benchmarks/data_pipeline.py [--data_dir /tmp/coder_jax_bench] [--steps 3]

Builds (once) the embedded default corpus (this interpreter's standard library) with a trained
tokenizer, then measures:
  * pipeline: packed batches (FIM 0.5, sequence length 4096) per second, as tokens/s;
  * trainer: tokens/s of a jitted train step (forward + backward + AdamW) for the tiny preset and
    a Lite proxy (Lite's widths: hidden 2048, MLA 16 heads, 64 routed + 2 shared experts top-6,
    moe ff 1408, dense ff 10944; 2 layers, one dense and one MoE; the corpus tokenizer's vocab).
Sequence lengths and batches of the train steps are cut to what 24 GB of host memory holds.
The pipeline must outpace the trainer; the last column says by how much.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

from host import cpu_model  # benchmarks/, the script's folder, is on sys.path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pipeline_rate(data_dir: str, tok: str, seq_len: int, batch: int, batches: int) -> float:
  from coder_jax.data.pipeline import DataConfig, Pipeline
  pipe = Pipeline(DataConfig(data_dir, tok, seq_len=seq_len, batch_size=batch, seed=0))
  next(pipe)  # graph construction, file opening, shuffle buffer fill
  t0 = time.perf_counter()
  tokens = sum(int((next(pipe)["segment_ids"] > 0).sum()) for _ in range(batches))
  return tokens / (time.perf_counter() - t0)  # real tokens: padding is not counted


def train_rate(cfg, seq_len: int, batch: int, steps: int) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from coder_jax.model.decoder import init_model

  model = init_model(cfg, seed=0)
  graphdef, params = nnx.split(model)
  opt = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = opt.init(params)

  def loss_fn(p, ids):
    logits = nnx.merge(graphdef, p)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, ids):
    loss, g = jax.value_and_grad(loss_fn)(p, ids)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1)))
  params, opt_state, loss = step(params, opt_state, ids)
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, ids)
  jax.block_until_ready(loss)
  return steps * batch * seq_len / (time.perf_counter() - t0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data_dir", default="/tmp/coder_jax_bench")
  ap.add_argument("--batches", type=int, default=10)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args(argv)

  import jax
  import tensorflow as tf
  from coder_jax.data.__main__ import main as data_main
  from coder_jax.data.layout import find_dataset
  from coder_jax.data.tokenizer import load_tokenizer
  from coder_jax.model.config import get_config

  tok = os.path.join(args.data_dir, "tokenizer.json")
  if not os.path.exists(tok):
    data_main(["build", "--out", args.data_dir])
  dataset_dir = find_dataset(args.data_dir)
  vocab = load_tokenizer(tok).get_vocab_size()

  lite_proxy = get_config("coder_v2_lite", num_hidden_layers=2, vocab_size=vocab,
                          dtype="float32", param_dtype="float32", moe_impl="tiled")
  rows = [("pipeline, seq 4096, batch 8", pipeline_rate(dataset_dir, tok, 4096, 8, args.batches))]
  # batch 2: the XLA reference attention materialises [B, H, 4096, 4096] scores on CPU.
  rows.append(("train step, tiny, seq 4096, batch 2",
               train_rate(get_config("tiny", vocab_size=vocab), 4096, 2, args.steps)))
  # moe_impl "tiled": XLA:CPU lowers lax.ragged_dot to a dense product over all 64 experts.
  rows.append(("train step, Lite proxy, seq 1024, batch 1",
               train_rate(lite_proxy, 1024, 1, args.steps)))
  print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}, tensorflow {tf.__version__}; vocab {vocab}")
  print(f"| {'work':<44} | {'tokens/s':>10} | {'pipeline / this':>15} |")
  print(f"|{'-' * 46}|{'-' * 12}|{'-' * 17}|")
  for name, rate in rows:
    print(f"| {name:<44} | {rate:>10,.0f} | {rows[0][1] / rate:>14.1f}x |")


if __name__ == "__main__":
  main()
