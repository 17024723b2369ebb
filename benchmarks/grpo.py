"""Seconds per GRPO step and its split, coder_jax beside TRL's GRPOTrainer, in one table.

    pip install -r benchmarks/requirements-peer.txt  # TRL 1.16 and what it adds
    python benchmarks/grpo.py                       # CPU: both sides, ~3 minutes on 2 idle cores
    python benchmarks/grpo.py --stage               # + the real grpo() stage end to end (~4 min)
    python benchmarks/grpo.py --profile --skip_trl  # where coder_jax's step time goes (~7 min)

One random DeepSeek-V2 model (transformers' DeepseekV2ForCausalLM, its default init, float32:
hidden 512, 4 layers (1 dense + 3 MoE), 8 heads, q/k 64 + 32 rope, v 64, kv_lora 128, 16 routed
experts top-4 + 2 shared of width 256, dense ff 1536, vocab 4096) is saved once with
save_pretrained and both sides load it. A byte-level BPE of exactly 4096 tokens
(coder_jax.data.tokenizer, trained on the problem set and a few stdlib packages) goes beside it as
coder_jax.hf writes tokenizer files, so both sides encode the same prompt ids.
A step: 8 prompts of the project's problem set (rendered as the grpo stage renders them; 8 new
ones per step from a pool whose prompt lengths share one 16-token bucket) x G = 4 samples x 32
new tokens at temperature 1; a reward; group advantages; the clipped ratio (eps 0.2) with k3 KL
to the frozen start (beta 0.04, hence a reference forward); token-mean (DAPO) aggregation; one
AdamW update per batch (lr 1e-6, betas 0.9 / 0.95, weight decay 0.1, clip 1.0). The reward is
the same cheap python function on both sides (the share of digit characters in a reply), so its
time is equal and small; the sandbox reward (the problems' tests) is timed once apart, on one
step's replies.

coder_jax: the grpo stage's own pieces (coder_jax/stages/grpo.py: Rollouts with the latent-cache
sampler, the stage's reference forward and layout; grpo_objective + train.step.make_step jitted
as the loop jits it), blocking after each phase so that the split is exact. With --stage, a row
for the real `grpo()` call (the shared loop: async dispatch, metrics, tensorboard; its final
checkpoint is outside the timed steps), read from its metrics.jsonl.
TRL: GRPOTrainer (num_generations 4, per-device batch 32 = one step, max_completion_length 32,
beta 0.04, num_iterations 1, loss_type "dapo", bf16 off, no vLLM), timed by a TrainerCallback
(on_step_begin / on_step_end) and by wrapping its _generate, _calculate_rewards and
_generate_and_score_completions ("reference" = the last minus the first two: the reference
forward and the advantages' bookkeeping).
Each side runs in its own process; both load at once, then they take turns, one step each, so
that on a shared machine both meet the same load (the ratio per pair of neighbouring steps is
printed too). Per phase: the median over the steps after the warm-up ones (compiles, first
allocations) of wall seconds and of CPU seconds (every thread of the process; torch's OpenMP
threads also count while they spin-wait).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from host import cpu_model  # benchmarks/, the script's folder, is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
             first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
             routed_scaling_factor=1.0, max_position_embeddings=2048, rope_scaling=None,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
PROMPTS, GROUP, NEW_TOKENS, BETA, LR = 8, 4, 32, 0.04, 1e-6
PHASES = ("total", "sampling", "reward", "reference", "update")


def digit_share(texts) -> list[float]:
  """The shared reward: the fraction of a reply's characters that are digits."""
  return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]


class Clock:
  """Adds wall and CPU seconds (every thread of this process) per phase name."""

  def __init__(self):
    self.wall, self.cpu = {}, {}

  def wrap(self, name, fn):
    def timed(*a, **kw):
      w, c = time.perf_counter(), time.process_time()
      try:
        return fn(*a, **kw)
      finally:
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
    return timed

  def take(self) -> tuple[dict, dict]:
    out = (self.wall, self.cpu)
    self.wall, self.cpu = {}, {}
    return out


class Gate:
  """A worker's turn: `begin()` says ready and waits for the parent's go, `end()` says done.
  The parent lets one worker run one step at a time, alternating, so both sides meet the same
  load on a shared machine (no-ops when the worker runs alone)."""

  def __init__(self, fds: str | None):
    self.r = self.w = None
    if fds:
      r, w = map(int, fds.split(","))
      self.r, self.w = os.fdopen(r, "r"), os.fdopen(w, "w")

  def begin(self):
    if self.w:
      self.w.write("ready\n")
      self.w.flush()
      self.r.readline()

  def end(self):
    if self.w:
      self.w.write("done\n")
      self.w.flush()


def median_rows(rows: list[dict], warmup: int) -> dict:
  timed = rows[warmup:]
  return {k: statistics.median(r[k] for r in timed) for k in timed[0]
          if isinstance(timed[0][k], float)}


# --- Setup (parent process): the weights, the tokenizer, the prompt pool.


def build_setup(out: str, num_prompts: int) -> dict:
  import torch
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

  from coder_jax import problems
  from coder_jax.data.tokenizer import iter_text_files, train_tokenizer
  from coder_jax.hf.tokenizer_files import export_files
  from coder_jax.stages.grpo import prompt_text
  items, _ = problems.load(split="train")
  texts = [p.prompt + (p.canonical_solution or "") + "\n" + p.tests for p in items]
  # The problem set alone has too few merges for 4096 tokens: add some of the standard library.
  stdlib = os.path.dirname(os.__file__)
  texts += list(iter_text_files([os.path.join(stdlib, d) for d in ("json", "email", "asyncio")]))
  tok_path = os.path.join(out, "bpe4096.json")
  tok = train_tokenizer(texts, MODEL["vocab_size"], tok_path)
  if tok.get_vocab_size(with_added_tokens=True) != MODEL["vocab_size"]:
    raise RuntimeError(f"the tokenizer has {tok.get_vocab_size()} tokens, not "
                       f"{MODEL['vocab_size']}")
  # Prompts of one 16-token bucket (the fullest): close lengths, as in the earlier results (the
  # stage's sampler pads every batch to the longest prompt of the run, so it compiles once).
  n_ids = {p.task_id: 1 + len(tok.encode(prompt_text(p), add_special_tokens=False).ids)
           for p in items}
  buckets = collections.Counter(-(-n // 16) for n in n_ids.values())
  fullest = buckets.most_common(1)[0][0]
  pool = [p for p in items if -(-n_ids[p.task_id] // 16) == fullest][:num_prompts]
  if len(pool) < num_prompts:
    raise RuntimeError(f"{len(pool)} prompts in the fullest bucket; ask for fewer steps")
  lengths = [n_ids[p.task_id] for p in pool]
  hf_dir = os.path.join(out, "hf")
  torch.manual_seed(0)
  model = DeepseekV2ForCausalLM(DeepseekV2Config(**MODEL)).float()
  model.save_pretrained(hf_dir)
  files, _ = export_files(tok_path, vocab_size=MODEL["vocab_size"], model_max_length=2048)
  for name, text in files.items():
    with open(os.path.join(hf_dir, name), "w") as f:
      f.write(text)
  pool_path = os.path.join(out, "pool.jsonl")
  with open(pool_path, "w") as f:
    for p in pool:
      f.write(json.dumps({"task_id": p.task_id, "prompt": p.prompt, "entry_point": p.entry_point,
                          "tests": p.tests, "split": p.split,
                          "canonical_solution": p.canonical_solution}) + "\n")
  # The stage's row: the longest prompt (its prompt slot) + 32 new tokens, less one.
  seq_len = max(lengths) + NEW_TOKENS - 1
  return {"dir": out, "hf_dir": hf_dir, "tokenizer": tok_path, "pool": pool_path,
          "params": sum(x.numel() for x in model.parameters()),
          "prompt_tokens": [min(lengths), round(statistics.mean(lengths)), max(lengths)],
          "seq_len": seq_len}


def load_pool(setup: dict):
  from coder_jax import problems
  pool, skipped = problems.load(setup["pool"])
  if skipped:
    raise RuntimeError(f"pool records skipped: {dict(skipped)}")
  return pool


def optimizer_config():
  from coder_jax.train.optim import OptimizerConfig
  return OptimizerConfig(learning_rate=LR, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95,
                         weight_decay=0.1, clip_norm=1.0)


# --- coder_jax: the grpo stage's pieces, blocking between phases.


class Pieces:
  """What `grpo()` builds, built here so that each phase can be timed alone."""

  def __init__(self, setup: dict, train_steps: int, clock: Clock, group: int = GROUP,
               **runtime):
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from coder_jax import hf
    from coder_jax.data.tokenizer import load_tokenizer
    from coder_jax.parallel.mesh import MeshConfig, make_mesh
    from coder_jax.stages import grpo as stage
    from coder_jax.train.losses import BalanceLossConfig
    from coder_jax.train.optim import make_optimizer
    from coder_jax.train.state import init_state
    from coder_jax.train.step import make_step
    self.jax, self.clock, self.seen = jax, clock, {}
    model = hf.load(setup["hf_dir"], jax.numpy.float32, **runtime)
    self.cfg = cfg = model.cfg
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    self.mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    optimizer, schedule = make_optimizer(optimizer_config(), train_steps)
    slot = setup["prompt_tokens"][2]     # what grpo() takes: the longest prompt
    with jax.set_mesh(self.mesh):
      self.graphdef, self.state, shardings = init_state(cfg, optimizer, self.mesh, params=params)
    self.objective = stage.grpo_objective(cfg, temperature=1.0, eps_low=0.2, eps_high=0.2,
                                          beta=BETA, aggregation="token_mean",
                                          alphas=BalanceLossConfig(0.0, 0.0, 0.0),
                                          start=slot - 1, group=group)
    self.step_fn = jax.jit(make_step(self.graphdef, optimizer, schedule, self.objective),
                           in_shardings=(shardings, None),
                           out_shardings=(shardings, NamedSharding(self.mesh, P())),
                           donate_argnums=0)
    self.reference = stage._reference(self.graphdef, cfg, params, 1.0, slot - 1, group)

    def reward_fn(problems, replies):
      self.seen["problems"], self.seen["replies"] = problems, replies
      return digit_share(replies)

    self.rollouts = stage.Rollouts(
        problems=load_pool(setup), tokenizer=load_tokenizer(setup["tokenizer"]),
        tokenizer_path=setup["tokenizer"], graphdef=self.graphdef, cfg=cfg, mesh=self.mesh,
        rows=PROMPTS * GROUP, global_rows=PROMPTS * GROUP, shard=0, group_size=GROUP,
        prompt_slot=slot, max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0,
        reward=stage.RewardConfig(rm_weight=0.0, functions=(clock.wrap("reward", reward_fn),)),
        scorer=None, updates=1, seed=0, start_batch=0,
        # Blocking on the reference here keeps the phases apart (the stage overlaps it with
        # the reward, which here is too cheap to hide anything).
        ref_logp=clock.wrap("reference", lambda b: jax.block_until_ready(self.reference(b))))

  def rollout(self) -> dict:
    """One batch of samples from the current policy, rewarded and laid out (numpy)."""
    with self.jax.set_mesh(self.mesh):
      return self.rollouts.next_with(self.state)

  def update(self, local: dict) -> dict:
    jax = self.jax
    with jax.set_mesh(self.mesh):
      batch = {k: jax.device_put(v) for k, v in local.items() if k in self.objective.batch_axes}
      self.state, m = self.step_fn(self.state, batch)
      return jax.device_get(m)


def run_ours(setup: dict, steps: int, warmup: int, gate: Gate) -> dict:
  import jax

  from coder_jax.problems import execution_rewards
  from coder_jax.stages.grpo import body_of
  # The module, not the function that coder_jax.decode re-exports under the same name.
  gen = importlib.import_module("coder_jax.decode.generate")
  clock = Clock()
  gen.generate_ids = clock.wrap("sampling", gen.generate_ids)   # Rollouts imports it per call
  t0 = time.perf_counter()
  pieces = Pieces(setup, steps + warmup, clock)
  rows, load_s = [], time.perf_counter() - t0
  for i in range(warmup + steps):
    compiles = (gen._generate._cache_size(), pieces.step_fn._cache_size())
    gate.begin()
    w, c = time.perf_counter(), time.process_time()
    local = pieces.rollout()
    host = pieces.rollouts.host_metrics()
    m = clock.wrap("update", pieces.update)(local)
    wall, cpu = clock.take()
    wall["total"], cpu["total"] = time.perf_counter() - w, time.process_time() - c
    gate.end()
    rows.append({**{k: wall.get(k, 0.0) for k in PHASES},
                 **{f"cpu_{k}": cpu.get(k, 0.0) for k in PHASES},
                 "host_sampling": host["time_sampling_s"], "response_len": host["response_len"],
                 "loss": float(m["loss"]),
                 "new_compiles": [gen._generate._cache_size() - compiles[0],
                                  pieces.step_fn._cache_size() - compiles[1]]})
    print(f"  coder_jax step {i}: {rows[-1]['total']:.2f} s", file=sys.stderr, flush=True)
  # The stage's execution reward on the last batch's replies, timed alone.
  gate.begin()
  w = time.perf_counter()
  _, reasons = execution_rewards(pieces.seen["problems"],
                                 [body_of(r) for r in pieces.seen["replies"]], timeout_s=5.0)
  sandbox_s = time.perf_counter() - w
  gate.end()
  return {"rows": rows, "median": median_rows(rows, warmup), "load_s": load_s,
          "sandbox_s": sandbox_s, "sandbox_reasons": dict(reasons),
          "jax": jax.__version__}


# --- coder_jax: the real grpo() stage (the shared loop), end to end.


def run_stage(setup: dict, steps: int, warmup: int, gate: Gate) -> dict:
  from coder_jax.parallel.mesh import MeshConfig
  from coder_jax.stages import grpo as stage

  def digits(problems, replies):
    return digit_share(replies)

  model_dir = os.path.join(setup["dir"], "stage_run")
  t0 = time.perf_counter()
  stage.grpo(model_dir=model_dir, train_steps=warmup + steps, prompts_per_step=PROMPTS,
             group_size=GROUP, seq_len=setup["seq_len"], max_new_tokens=NEW_TOKENS,
             temperature=1.0, beta=BETA, aggregation="token_mean", updates_per_batch=1,
             prompts=stage.ProblemPrompts(path=setup["pool"], split=None,
                                          tokenizer=setup["tokenizer"],
                                          max_prompt_tokens=setup["prompt_tokens"][2]),
             reward=stage.RewardConfig(rm_weight=0.0, functions=(digits,)),
             mesh_config=MeshConfig(fsdp=1), optimizer_config=optimizer_config(),
             compute_dtype="float32", init_from_hf=setup["hf_dir"], checkpoint_every=10**6,
             async_checkpoints=False)
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  rows = [{"total": r["step_time_s"], "sampling": r["time_sampling_s"],
           "reward": r["time_reward_s"], "reference": r["time_reference_s"]} for r in logged]
  return {"rows": rows, "median": median_rows(rows, warmup), "wall_s": time.perf_counter() - t0}


# --- coder_jax: where the step's time goes (--profile).


def run_profile(setup: dict, steps: int, warmup: int, gate: Gate) -> dict:
  """Wall / CPU seconds of the step's parts and of variants that change only a runtime setting:
  every part compiled first, then 3 rounds that run each part once in turn (so load drifts hit
  all alike); medians."""
  import jax
  from flax import nnx

  from coder_jax.stages.grpo import prompt_text
  gen = importlib.import_module("coder_jax.decode.generate")
  jnp, out, parts = jax.numpy, {}, {}
  base = Pieces(setup, 10, Clock())
  local = base.rollout()                    # a real batch of the benchmark's shapes
  tok, eos = base.rollouts.tok, base.rollouts.eos
  prompts = [[base.rollouts.bos] + tok.encode(prompt_text(p), add_special_tokens=False).ids
             for p in base.rollouts._problems(0) for _ in range(GROUP)]
  t = base.rollouts.prompt_slot             # the stage pads prompts to it
  ids = jnp.asarray([p + [0] * (t - len(p)) for p in prompts], jnp.int32)
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  table, live = gen._stop_table(())

  def sampler(name, p):
    """The stage's sampling program (generate_ids' jitted loop) for Pieces p, compiled now."""
    params = jax.tree.map(lambda a: a.copy(), p.state["params"])  # updates donate the state
    graphdef, state = nnx.split(nnx.merge(p.graphdef, params))
    args = (state, ids, lengths, jax.random.key(0), jnp.float32(1.0), jnp.int32(0),
            jnp.float32(1.0), jnp.int32(eos), table, live)
    w = time.perf_counter()
    with jax.set_mesh(p.mesh):
      exe = gen._generate.lower(graphdef, *args, max_new_tokens=NEW_TOKENS, attend="auto",
                                group=GROUP).compile()
    out[f"compile {name}"] = time.perf_counter() - w
    parts[name] = lambda: jax.block_until_ready(exe(*args))

  def updater(name, p):
    batch = {k: jax.device_put(v) for k, v in local.items() if k in p.objective.batch_axes}
    w = time.perf_counter()
    with jax.set_mesh(p.mesh):
      exe = p.step_fn.lower(p.state, batch).compile()
    out[f"compile {name}"] = time.perf_counter() - w
    holder = [p.state]                # donated: each call consumes the state the last one made

    def one():
      holder[0], m = exe(holder[0], batch)
      jax.block_until_ready(m)
    parts[name] = one

  full_rows = Pieces(setup, 10, Clock(), group=1)
  sampler("generate (as the stage samples)", base)
  params = jax.tree.map(jnp.copy, base.state["params"])
  graphdef, state = nnx.split(nnx.merge(base.graphdef, params))
  prefill = jax.jit(lambda s: gen.prefill(nnx.merge(graphdef, s), ids[::GROUP],
                                           lengths[::GROUP], t + NEW_TOKENS))
  parts["  its prefill alone (one row per prompt)"] = lambda: jax.block_until_ready(
      prefill(state))
  parts["reference forward (the stage's)"] = lambda: jax.block_until_ready(base.reference(local))
  parts["  every row in full (group 1), reference"] = lambda: jax.block_until_ready(
      full_rows.reference(local))
  updater("update (the jitted train step)", base)
  updater("  every row in full (group 1), update", full_rows)
  times = {name: [] for name in parts}
  for fn in parts.values():
    fn()                              # first runs (allocations) untimed
  for _ in range(3):
    for name, fn in parts.items():
      w, c = time.perf_counter(), time.process_time()
      fn()
      times[name].append((time.perf_counter() - w, time.process_time() - c))
  out["parts"] = {name: [statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)]
                  for name, v in times.items()}
  out["bucket"], out["row"] = t, int(local["inputs"].shape[1])
  out["real_tokens"] = int(local["segment_ids"].sum())
  return out


# --- TRL's GRPOTrainer on the same weights and prompts.


def run_trl(setup: dict, steps: int, warmup: int, gate: Gate) -> dict:
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer

  from coder_jax.stages.grpo import prompt_text
  torch.manual_seed(0)
  t0 = time.perf_counter()
  tok = AutoTokenizer.from_pretrained(setup["hf_dir"])
  model = AutoModelForCausalLM.from_pretrained(setup["hf_dir"], dtype=torch.float32)
  data = Dataset.from_list([{"prompt": prompt_text(p)} for p in load_pool(setup)])
  clock, rows = Clock(), []

  def reward(completions, **_):
    return digit_share(completions)

  class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      gate.begin()
      clock.take()
      self.t = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kw):
      wall, cpu = clock.take()
      wall["total"], cpu["total"] = time.perf_counter() - self.t[0], time.process_time() - self.t[1]
      gate.end()
      row = {}
      for prefix, d in (("", wall), ("cpu_", cpu)):
        g, r, roll = d.get("sampling", 0.0), d.get("reward", 0.0), d.get("rollout", 0.0)
        row.update({f"{prefix}total": d["total"], f"{prefix}sampling": g, f"{prefix}reward": r,
                    f"{prefix}reference": roll - g - r, f"{prefix}update": d["total"] - roll})
      rows.append(row)
      print(f"  TRL step {len(rows) - 1}: {row['total']:.2f} s", file=sys.stderr, flush=True)

  args = GRPOConfig(
      output_dir=os.path.join(setup["dir"], "trl_run"), per_device_train_batch_size=PROMPTS * GROUP,
      num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA,
      num_iterations=1, epsilon=0.2, loss_type="dapo", learning_rate=LR,
      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9,
      adam_beta2=0.95, max_grad_norm=1.0, max_steps=warmup + steps, bf16=False, use_cpu=True,
      use_vllm=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
      disable_tqdm=True, dataloader_num_workers=0)
  trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                        processing_class=tok, callbacks=[Timer()])
  trainer._generate = clock.wrap("sampling", trainer._generate)
  trainer._calculate_rewards = clock.wrap("reward", trainer._calculate_rewards)
  trainer._generate_and_score_completions = clock.wrap(
      "rollout", trainer._generate_and_score_completions)
  load_s = time.perf_counter() - t0
  trainer.train()
  lengths = [h["completions/mean_length"] for h in trainer.state.log_history
             if "completions/mean_length" in h]
  return {"rows": rows, "median": median_rows(rows, warmup), "load_s": load_s,
          "response_len": statistics.mean(lengths) if lengths else float("nan"),
          "torch": torch.__version__, "transformers": transformers.__version__,
          "trl": trl.__version__, "torch_threads": torch.get_num_threads(),
          "experts_impl": str(getattr(model.config, "_experts_implementation", "?")),
          "attn_impl": str(model.config._attn_implementation)}


# --- Parent: set up, run each side in its own process, print the tables.


class Worker:
  """One side in its own process; its turns come over two pipes (see Gate)."""

  def __init__(self, kind: str, setup: dict, steps: int, warmup: int):
    self.kind, self.result = kind, os.path.join(setup["dir"], f"{kind}.json")
    to_child, from_child = os.pipe(), os.pipe()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--setup",
           json.dumps(setup), "--steps", str(steps), "--warmup", str(warmup), "--result",
           self.result, "--gate", f"{to_child[0]},{from_child[1]}"]
    self.log = open(os.path.join(setup["dir"], f"{kind}.log"), "w+")
    self.t0 = time.perf_counter()
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=self.log,
                                 pass_fds=(to_child[0], from_child[1]))
    os.close(to_child[0])
    os.close(from_child[1])
    self.w, self.r = os.fdopen(to_child[1], "w"), os.fdopen(from_child[0], "r")
    self.state = None

  def wait_ready(self):
    self.state = self.r.readline()      # "ready\n", or "" when it ended

  def turn(self):
    """Lets the worker run one gated unit, then waits until it is ready again (or ended)."""
    self.w.write("go\n")
    self.w.flush()
    if self.r.readline() != "done\n":
      self.state = ""
      return
    self.wait_ready()

  def finish(self) -> dict:
    code = self.proc.wait()
    self.log.seek(0)
    if code:
      tail = "\n".join(self.log.read().splitlines()[-25:])
      raise RuntimeError(f"the {self.kind} worker failed (exit {code}):\n{tail}")
    with open(self.result) as f:
      out = json.load(f)
    out["process_s"] = time.perf_counter() - self.t0
    print(f"{self.kind}: {out['process_s']:.0f} s", file=sys.stderr, flush=True)
    return out


def run_workers(kinds, setup: dict, steps: int, warmup: int) -> list[dict]:
  """Starts the workers together (loading overlaps), then alternates their gated steps."""
  workers = [Worker(k, setup, steps, warmup) for k in kinds]
  for w in workers:
    w.wait_ready()
  while any(w.state == "ready\n" for w in workers):
    for w in workers:
      if w.state == "ready\n":
        w.turn()
  return [w.finish() for w in workers]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiles)")
  ap.add_argument("--stage", action="store_true", help="also run the real grpo() stage")
  ap.add_argument("--profile", action="store_true", help="also time coder_jax's parts")
  ap.add_argument("--skip_trl", action="store_true")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--setup", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  ap.add_argument("--gate", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    run = {"ours": run_ours, "stage": run_stage, "trl": run_trl, "profile": run_profile}
    out = run[args.worker](json.loads(args.setup), args.steps, args.warmup, Gate(args.gate))
    with open(args.result, "w") as f:
      json.dump(out, f)
    return
  t0, load_before = time.perf_counter(), os.getloadavg()
  out_dir = tempfile.mkdtemp(prefix="grpo_bench_")
  try:
    setup = build_setup(out_dir, PROMPTS * (args.steps + args.warmup))
    run = lambda *kinds: run_workers(kinds, setup, args.steps, args.warmup)
    ours, peer = run("ours") + [None] if args.skip_trl else run("ours", "trl")
    stage = run("stage")[0] if args.stage else None
    prof = run("profile")[0] if args.profile else None
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  report(setup, ours, stage, peer, prof, args, load_before, os.getloadavg(),
         time.perf_counter() - t0)


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def report(setup, ours, stage, peer, prof, args, load_before, load_after, wall):
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(f"{now}; {os.cpu_count()} CPUs ({cpu_model()}); python "
        f"{platform.python_version()}; jax {ours['jax']}" +
        (f"; torch {peer['torch']} ({peer['torch_threads']} threads, experts "
         f"{peer['experts_impl']}, attention {peer['attn_impl']}), transformers "
         f"{peer['transformers']}, trl {peer['trl']}" if peer else ""))
  p = setup["prompt_tokens"]
  print(f"model {setup['params'] / 1e6:.1f}M parameters, float32; prompts {p[0]}-{p[2]} tokens "
        f"(mean {p[1]}), coder_jax rows of {setup['seq_len']}; {PROMPTS} prompts x G {GROUP} x "
        f"{NEW_TOKENS} new tokens; median of {args.steps} steps after {args.warmup} warm-up; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; run {wall:.0f} s\n")
  o, t = ours["median"], peer["median"] if peer else {}
  print("| work per step | coder_jax s | TRL s | TRL / coder_jax | coder_jax CPU s | TRL CPU s "
        "| TRL / coder_jax (CPU) |")
  print("|---|---|---|---|---|---|---|")
  names = {"total": "whole step", "sampling": "sampling (prefill + 32 tokens)",
           "reward": "reward (digit share, python)",
           "reference": "reference forward (k3 KL)", "update": "update (fwd + bwd + AdamW)"}
  for k in PHASES:
    tw, tc = t.get(k), t.get(f"cpu_{k}")
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b and b > 0.05 else "-"
    print(f"| {names[k]} | {_fmt(o[k])} | {_fmt(tw)} | {ratio(tw, o[k])} | {_fmt(o['cpu_' + k])} "
          f"| {_fmt(tc)} | {ratio(tc, o['cpu_' + k])} |")
  if stage:
    print(f"| whole step, the real `grpo()` stage (run alone, after) | "
          f"{stage['median']['total']:.3f} | | | | | |")
  print(f"| sandbox reward, one step's {PROMPTS * GROUP} replies (coder_jax) | "
        f"{ours['sandbox_s']:.2f} | | | | | |")
  print()
  rows = ours["rows"]
  print(f"coder_jax: first steps {', '.join(_fmt(r['total']) for r in rows[:args.warmup])} s "
        f"(compiles); new compiles per step (generate, train step) "
        f"{[tuple(r['new_compiles']) for r in rows]}; host metric time_sampling_s "
        f"{o['host_sampling']:.2f} s; mean response "
        f"{statistics.mean(r['response_len'] for r in rows):.1f} tokens; sandbox verdicts "
        f"{ours['sandbox_reasons']}")
  if stage:
    m = stage["median"]
    print(f"grpo() stage: step_time_s {[round(r['total'], 2) for r in stage['rows']]}; medians of "
          f"its host metrics: time_sampling_s {m['sampling']:.2f}, time_reward_s "
          f"{m['reward']:.3f}, time_reference_s {m['reference']:.2f}; whole call "
          f"{stage['wall_s']:.0f} s (loading, compiles, final checkpoint)")
  if peer:
    print(f"TRL: first steps {', '.join(_fmt(r['total']) for r in peer['rows'][:args.warmup])} s; "
          f"mean response {peer['response_len']:.1f} tokens")
    pairs = list(zip(rows, peer["rows"]))[args.warmup:]
    per_pair = sorted(b["total"] / a["total"] for a, b in pairs)
    print(f"whole steps in turn order (coder_jax, TRL): "
          f"{[(round(a['total'], 2), round(b['total'], 2)) for a, b in pairs]}; TRL / coder_jax "
          f"per pair: median {statistics.median(per_pair):.2f}x, range {per_pair[0]:.2f}-"
          f"{per_pair[-1]:.2f}x")
  if prof:
    report_profile(prof)


def report_profile(q):
  print(f"\ncoder_jax parts (--profile; medians of 3 interleaved rounds; prompts padded to "
        f"{q['bucket']}, update rows of {q['row']}, {q['real_tokens']} real tokens of "
        f"{PROMPTS * GROUP * q['row']}):\n")
  print("| part | wall s | CPU s |")
  print("|---|---|---|")
  for name, (w, c) in q["parts"].items():
    print(f"| {name} | {w:.3f} | {c:.3f} |")
  print("\ncompile s: " + "; ".join(f"{k[8:].strip()} {v:.1f}" for k, v in q.items()
                                     if k.startswith("compile ")))


if __name__ == "__main__":
  main()
