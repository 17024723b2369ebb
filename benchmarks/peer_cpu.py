"""coder_jax beside transformers on one random DeepSeek-V2, on the CPU, in one table.

    python benchmarks/peer_cpu.py                # ~4 minutes on 2 idle cores
    python benchmarks/peer_cpu.py --reps 3 --batches 1

The model is benchmarks/grpo.py's (transformers' DeepseekV2ForCausalLM with its default init,
float32: hidden 512, 4 layers (1 dense + 3 MoE), 8 heads, kv_lora 128, 16 routed experts top-4 +
2 shared, vocab 4096), saved once with save_pretrained; coder_jax loads that directory with
coder_jax.hf.load, so both hold the same weights.

Rows:
  forward + backward   the mean next-token cross-entropy of a [batch, length] block of random
                       ids and its gradient for every parameter (coder_jax: jax.value_and_grad,
                       jitted, of the loss as its training objective forms it: the hidden
                       states, then model.logprobs.cross_entropy_from_hidden; transformers:
                       model(ids, labels=ids).loss.backward() in train mode); tokens/s =
                       batch x length / seconds.
  greedy decode        prompts of random ids (one length), max_new_tokens new tokens, EOS off on
                       both sides so that every row makes them all (coder_jax: generate_ids;
                       transformers: model.generate(do_sample=False) with its default dynamic
                       cache); the prefill is inside the timing on both sides; tokens/s = new
                       tokens of the batch / seconds.
Each rep runs one side then the other, so that both meet the same load on a shared machine; the
table gives the median over the reps after one warm-up (coder_jax's warm-up holds its compile,
reported apart). Checks printed under the table: the two losses agree (rel <= 1e-4) and the
greedy tokens are identical row by row (a row that differs gets the step where it first does).

A second table (--matmuls, on by default) times single float32 matrix products of the shapes the
forward + backward runs, XLA:CPU (a jitted jnp.dot) beside torch.matmul, alternating: the
library floor under the first row.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def side_by_side(name: str, ours, theirs, work: float, reps: int) -> dict:
  """Runs ours() and theirs() alternately (1 warm-up + reps each); tokens/s medians."""
  (our_out, first), (their_out, _) = timed(ours), timed(theirs)
  t_ours, t_theirs = [], []
  for _ in range(reps):
    t_ours.append(timed(ours)[1])
    t_theirs.append(timed(theirs)[1])
  row = {"name": name, "ours": work / statistics.median(t_ours),
         "theirs": work / statistics.median(t_theirs), "first_s": first,
         "our_out": our_out, "their_out": their_out}
  print(f"  {name}: coder_jax {row['ours']:,.1f} tokens/s, transformers {row['theirs']:,.1f} "
        f"tokens/s (first call {first:.1f} s)", file=sys.stderr, flush=True)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--train_batch", type=int, default=8)
  ap.add_argument("--train_length", type=int, default=256)
  ap.add_argument("--prompt_length", type=int, default=128)
  ap.add_argument("--max_new_tokens", type=int, default=64)
  ap.add_argument("--batches", default="1,16", help="decode batch sizes")
  ap.add_argument("--moe_impl", default="auto")
  ap.add_argument("--matmuls", action=argparse.BooleanOptionalAction, default=True,
                  help="also time the model's matrix products alone")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

  from coder_jax import hf
  from coder_jax.decode.generate import generate_ids
  from coder_jax.model.logprobs import cross_entropy_from_hidden
  from grpo import MODEL
  from host import cpu_model

  torch.manual_seed(0)
  theirs = DeepseekV2ForCausalLM(DeepseekV2Config(**MODEL)).float()
  tmp = tempfile.mkdtemp(prefix="peer_cpu_")
  theirs.save_pretrained(tmp)
  ours = hf.load(tmp, jnp.float32, moe_impl=args.moe_impl)
  graphdef, params = nnx.split(ours)
  rng = np.random.default_rng(0)
  rows = []

  # Forward + backward.
  b, t = args.train_batch, args.train_length
  ids = rng.integers(3, MODEL["vocab_size"], (b, t)).astype(np.int32)

  @jax.jit
  def loss_and_grad(params, ids):
    # As transformers does: the targets move left and the last position gets weight 0 (no
    # copy of the logits without their last position).
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.ones(ids.shape).at[:, -1].set(0.0)

    def loss(p):
      model = nnx.merge(graphdef, p)
      h, _ = model.hidden_states(ids)
      return cross_entropy_from_hidden(model, h, targets, weights) / (
          ids.shape[0] * (ids.shape[1] - 1))
    return jax.value_and_grad(loss)(params)

  ids_j, ids_t = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

  def ours_fb():
    return float(jax.block_until_ready(loss_and_grad(params, ids_j))[0])

  def theirs_fb():
    theirs.zero_grad(set_to_none=True)
    out = theirs(ids_t, labels=ids_t)
    out.loss.backward()
    return float(out.loss)

  theirs.train()
  rows.append(side_by_side(f"forward + backward, {b} x {t}", ours_fb, theirs_fb, b * t,
                           args.reps))
  loss_rel = abs(rows[-1]["our_out"] - rows[-1]["their_out"]) / abs(rows[-1]["their_out"])

  # Greedy decode.
  theirs.eval()
  theirs.generation_config.eos_token_id = None
  checks = [f"loss: coder_jax {rows[0]['our_out']:.6f}, transformers {rows[0]['their_out']:.6f} "
            f"(rel {loss_rel:.1e}) {'OK' if loss_rel <= 1e-4 else 'DIFFERENT'}"]
  new = args.max_new_tokens
  for batch in (int(x) for x in args.batches.split(",")):
    prompts = rng.integers(3, MODEL["vocab_size"], (batch, args.prompt_length)).astype(np.int64)

    def ours_dec():
      return generate_ids(ours, prompts.tolist(), max_new_tokens=new).tokens

    def theirs_dec():
      with torch.no_grad():
        out = theirs.generate(torch.from_numpy(prompts), max_new_tokens=new, do_sample=False,
                              min_new_tokens=0, pad_token_id=0)
      return out[:, prompts.shape[1]:].tolist()

    rows.append(side_by_side(f"greedy decode, batch {batch}", ours_dec, theirs_dec,
                             batch * new, args.reps))
    a, c = rows[-1]["our_out"], rows[-1]["their_out"]
    same = sum(x == y for x, y in zip(a, c))
    first = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
             for x, y in zip(a, c) if x != y]
    checks.append(f"batch {batch}: greedy tokens identical in {same}/{batch} rows"
                  + (f"; differing rows first differ at steps {first}" if first else ""))

  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  load = os.getloadavg()
  print(f"{now}; {cpu_model()}, {os.cpu_count()} cores, load "
        f"{load[0]:.1f}; jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; moe_impl {args.moe_impl}; median of {args.reps} reps\n")
  print("| work | coder_jax tokens/s | transformers tokens/s | coder_jax / transformers | "
        "coder_jax first call s |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['ours']:,.1f} | {r['theirs']:,.1f} | "
          f"{r['ours'] / r['theirs']:.2f}x | {r['first_s']:.1f} |")
  print()
  for line in checks:
    print(f"- {line}")
  if args.matmuls:
    matmul_table(b * t, args.reps)


# [M, K] x [K, N] products of the forward + backward at 8 x 256 tokens (forward shapes and the
# backward's transposed ones).
MATMULS = [
    ("dense MLP gate / up", 2048, 512, 1536), ("dense MLP down", 2048, 1536, 512),
    ("shared experts gate / up", 2048, 512, 512), ("one expert's 512 rows, gate / up", 512, 512, 256),
    ("one expert's 512 rows, down", 512, 256, 512), ("LM head", 2048, 512, 4096),
    ("LM head, input gradient", 2048, 4096, 512), ("LM head, weight gradient", 512, 2048, 4096)]


def matmul_table(tokens: int, reps: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  mm = jax.jit(jnp.dot)
  print(f"\nMatrix products alone, float32 (the shapes of the {tokens}-token forward + backward); "
        f"median of {3 * reps} alternating calls:\n")
  print("| product | [M, K] x [K, N] | XLA:CPU GFLOP/s | torch GFLOP/s | XLA / torch |")
  print("|---|---|---|---|---|")
  for name, m, k, n in MATMULS:
    a, b = (rng.standard_normal(sh).astype(np.float32) for sh in ((m, k), (k, n)))
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    ours = lambda: jax.block_until_ready(mm(ja, jb))
    theirs = lambda: torch.matmul(ta, tb)
    ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(3 * reps):
      t_ours.append(timed(ours)[1])
      t_theirs.append(timed(theirs)[1])
    fl = 2 * m * k * n / 1e9
    x, y = fl / statistics.median(t_ours), fl / statistics.median(t_theirs)
    print(f"| {name} | [{m}, {k}] x [{k}, {n}] | {x:.0f} | {y:.0f} | {x / y:.2f}x |")


if __name__ == "__main__":
  main()
