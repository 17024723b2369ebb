"""GRPO (DeepSeekMath's Group Relative Policy Optimization) on the project's problem set.

Each batch: P prompts (chat-rendered `User: {signature + docstring}\\n\\nAssistant:`, the SFT
format) x G samples from the current policy with the latent-cache sampler (on the training mesh,
parameters as they are after the last update, cast to the compute dtype); rewards from the reward
model (scores of prompt + response), from the sandbox (the problem's tests on prompt + body) or a
weighted mix; advantages (r - mean) / (std + eps) within each prompt's group; then
`updates_per_batch` updates of the clipped-ratio objective with per-token k3 KL to the frozen
reference (train/grpo.py). Everything else (checkpoints, resume, the non-finite guard, metrics)
is the shared loop's. Resuming in the middle of a batch's updates samples that batch again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coder_jax.data.tokenizer import BOS, EOS
from coder_jax.model.logprobs import token_logprobs
from coder_jax.parallel.mesh import MeshConfig, check_fit, make_mesh
from coder_jax.train import loop
from coder_jax.train import state as train_state
from coder_jax.train.grpo import ADVANTAGE_SCALES, grpo_loss, group_advantages
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.metrics import open_jsonl
from coder_jax.train.optim import OptimizerConfig, make_optimizer
from coder_jax.train.step import ROW_AXES, TOKEN_AXES, Objective, expert_load, make_step, moe_balance

TOKEN_KEYS = ("inputs", "targets", "segment_ids", "positions", "mask", "old_logp")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """reward = rm_weight * RM score + execution_weight * (1 if the tests pass else 0)
             + sum_j function_weights[j] * functions[j](problems, replies).

  functions: callables (problems, replies) -> one number per reply (bind with gin, e.g.
  `RewardConfig.functions = (@my_reward,)` after registering my_reward as configurable). One
  that raises, or returns the wrong count or a non-finite number, gives those rows 0 and counts
  the reason (reward_reason_<name>_error); a run never stops on a reward."""
  reward_model: str | None = None     # an RM's HF export or reward_model MODEL_DIR
  rm_weight: float = 1.0
  execution_weight: float = 0.0
  timeout_s: float = 5.0
  functions: tuple = ()
  function_weights: tuple = ()

  def check(self):
    if self.rm_weight and not self.reward_model:
      raise ValueError("RewardConfig: rm_weight is set but reward_model is not (give the reward "
                       "model's directory, or set rm_weight = 0 and execution_weight > 0)")
    if len(self.function_weights) not in (0, len(self.functions)):
      raise ValueError(f"RewardConfig: {len(self.function_weights)} function_weights for "
                       f"{len(self.functions)} functions")
    if not (self.rm_weight or self.execution_weight or self.functions):
      raise ValueError("RewardConfig: no reward: rm_weight and execution_weight are 0 and there "
                       "are no functions")


def function_rewards(fn, problems, replies) -> tuple[np.ndarray, str | None]:
  """(rewards, None) or (zeros, the reason) when `fn` fails in any way."""
  name = getattr(fn, "__name__", type(fn).__name__)
  try:
    r = np.asarray(fn(problems, replies), np.float64).reshape(-1)
  except Exception:  # noqa: BLE001 -- a user's reward must not end the run
    return np.zeros(len(replies), np.float32), f"{name}_error"
  if r.shape[0] != len(replies) or not np.all(np.isfinite(r)):
    return np.zeros(len(replies), np.float32), f"{name}_error"
  return r.astype(np.float32), None


def grpo_objective(cfg, *, temperature, eps_low, eps_high, beta, aggregation, alphas,
                   chunk_size=1024, start: int = 0, group: int = 1) -> Objective:
  """start: the first position that can hold a response token (Rollouts' prompt_slot - 1);
  the vocabulary projection skips the positions before it. group: the rows' runs of one
  prompt (group_size): each prompt's columns run through the model once (token_logprobs)."""

  def norms(batch):
    m = batch["mask"].astype(jnp.float32)
    return {"tokens": jnp.maximum(m.sum(), 1.0),
            "rows": jnp.maximum((m.sum(axis=1) > 0).astype(jnp.float32).sum(), 1.0)}

  def loss_fn(model, mb, n):
    logp, entropy, aux = token_logprobs(model, mb["inputs"], mb["targets"], mb["segment_ids"],
                                        mb["positions"], chunk_size=chunk_size,
                                        temperature=temperature, return_entropy=True,
                                        return_aux=True, start=start, group=group)
    loss, metrics = grpo_loss(logp, mb["old_logp"], mb.get("ref_logp"), mb["advantages"],
                              mb["mask"], eps_low=eps_low, eps_high=eps_high, beta=beta,
                              aggregation=aggregation, num_tokens=n["tokens"], num_rows=n["rows"])
    bal, bal_metrics = moe_balance(cfg, alphas, aux, n)
    ent = jax.lax.stop_gradient(jnp.sum(entropy * mb["mask"]) / n["tokens"])
    return loss + bal, {**metrics, "entropy": ent, **bal_metrics}

  axes = {k: TOKEN_AXES for k in TOKEN_KEYS} | {"advantages": ROW_AXES}
  if beta:
    axes["ref_logp"] = TOKEN_AXES
  return Objective(loss_fn, axes, norms, expert_load)


@gin.configurable
def format_reward(problems, replies):
  """A reward function (RewardConfig.functions = (@format_reward,)): 1 when the problem's prompt
  + the reply's function body compiles and returns a value (problems.format_rewards), else 0."""
  from coder_jax.problems import format_rewards
  return format_rewards(problems, [body_of(r) for r in replies])


def prompt_text(problem) -> str:
  """The SFT chat format up to the assistant's reply (coder_jax/data/chat.py's template)."""
  return f"User: {problem.prompt}\n\nAssistant:"


def body_of(reply: str) -> str:
  """The template puts one space after `Assistant:`; the function body starts after it."""
  return reply[1:] if reply.startswith(" ") else reply


class Rollouts:
  """The GRPO stream: samples a fresh batch from the current policy every `updates` steps."""

  needs_state = True

  def __init__(self, *, problems, tokenizer, tokenizer_path, graphdef, cfg, mesh, rows: int,
               global_rows: int, shard: int, group_size: int, prompt_slot: int,
               max_new_tokens: int,
               temperature: float, top_p: float, reward: RewardConfig, scorer, ref_logp,
               updates: int, seed: int, start_batch: int, scale_rewards: str = "group",
               samples_path: str | None = None, log_samples: int = 0):
    self.problems, self.tok, self.tokenizer_path = problems, tokenizer, tokenizer_path
    self.graphdef, self.cfg, self.mesh = graphdef, cfg, mesh
    self.rows, self.global_rows, self.shard, self.g = rows, global_rows, shard, group_size
    self.prompt_slot, self.max_new = prompt_slot, max_new_tokens
    self.seq_len = row_len(prompt_slot, max_new_tokens)
    self.temperature, self.top_p, self.reward, self.scorer = temperature, top_p, reward, scorer
    self.ref_logp, self.updates, self.seed = ref_logp, updates, seed
    self.scale_rewards = scale_rewards
    self.log_samples = log_samples
    # The replies a resumed run samples again replace the ones logged past its checkpoint.
    self._samples_log = (open_jsonl(samples_path, start_batch)
                         if samples_path and log_samples else None)
    self.batches = start_batch
    self._cache = None          # (rollout index, batch, host metrics)
    self._metrics = {}
    self.bos, self.eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    self.order = np.random.default_rng(seed).permutation(len(problems))

  def state(self) -> dict:
    return {"batches": self.batches}

  def host_metrics(self) -> dict:
    return dict(self._metrics)

  def close(self) -> None:
    if self._samples_log is not None:
      self._samples_log.close()
      self._samples_log = None

  def _problems(self, rollout: int) -> list:
    per = self.global_rows // self.g
    first = rollout * per + self.shard * (self.rows // self.g)
    return [self.problems[self.order[(first + i) % len(self.order)]]
            for i in range(self.rows // self.g)]

  def next_with(self, state) -> dict:
    rollout = self.batches // self.updates
    if self._cache is None or self._cache[0] != rollout:
      self._cache = (rollout, *self._sample(rollout, state["params"]))
    self.batches += 1
    _, batch, self._metrics = self._cache
    return batch

  def _sample(self, rollout: int, params):
    from coder_jax.decode.generate import generate_ids
    from coder_jax.problems import execution_rewards
    # The loop dispatches the previous update asynchronously: wait for it apart, so that the
    # sampling time is sampling alone.
    t_wait = time.perf_counter()
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    probs = self._problems(rollout)
    prompts = [[self.bos] + self.tok.encode(prompt_text(p), add_special_tokens=False).ids
               for p in probs for _ in range(self.g)]
    dt = jnp.dtype(self.cfg.dtype)
    policy = nnx.merge(self.graphdef, jax.tree.map(lambda x: x.astype(dt), params))
    out = generate_ids(policy, prompts, max_new_tokens=self.max_new,
                       temperature=self.temperature, top_p=self.top_p, eos_id=self.eos,
                       seed=self.seed * 1_000_003 + rollout * 64 + self.shard, mesh=self.mesh,
                       prompt_slot=self.prompt_slot, group_size=self.g)
    t1 = time.perf_counter()
    batch = self._layout(prompts, out)
    # The reference forward needs no reward: dispatched now, it runs on the device while the
    # host computes the rewards (the sandbox runs one process per reply).
    pending_ref = self.ref_logp(batch) if self.ref_logp is not None else None
    replies = [self.tok.decode(t) for t in out.tokens]
    group_problems = [p for p in probs for _ in range(self.g)]
    bodies = [body_of(r) for r in replies]
    rewards = np.zeros(len(prompts), np.float32)
    metrics, parts = {}, {}
    if self.reward.execution_weight:
      passed, reasons = execution_rewards(group_problems, bodies,
                                          timeout_s=self.reward.timeout_s)
      rewards += self.reward.execution_weight * passed
      parts["passed"] = passed
      metrics["pass_rate"] = float(passed.mean())
      metrics.update({f"reward_reason_{k}": v / len(replies) for k, v in reasons.items()})
    if self.reward.rm_weight:
      # The scorer renders the same chat template from the user text and the reply's content.
      scores = self.scorer.score([p.prompt for p in group_problems], bodies)
      rewards += self.reward.rm_weight * np.asarray(scores, np.float32)
      metrics["rm_score"] = float(np.mean(scores))
      parts["rm_score"] = scores
    weights = self.reward.function_weights or (1.0,) * len(self.reward.functions)
    for fn, w in zip(self.reward.functions, weights):
      r, failed = function_rewards(fn, group_problems, replies)
      rewards += w * r
      name = getattr(fn, '__name__', type(fn).__name__)
      metrics[f"reward_{name}"] = float(r.mean())
      parts[f"reward_{name}"] = r
      if failed:
        metrics[f"reward_reason_{failed}"] = 1.0
    t2 = time.perf_counter()
    self._log_replies(rollout * self.updates + 1, group_problems, replies, out.finish_reason,
                      rewards, parts)
    batch["advantages"] = np.asarray(group_advantages(rewards, self.g,
                                                      scale=self.scale_rewards), np.float32)
    if pending_ref is not None:
      batch["ref_logp"] = np.asarray(jax.device_get(pending_ref), np.float32) * batch["mask"]
    lengths = [len(t) + (f == "eos") for t, f in zip(out.tokens, out.finish_reason)]
    metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                   response_len=float(np.mean(lengths)), samples_per_s=len(prompts) / (t1 - t0),
                   time_wait_update_s=t0 - t_wait, time_sampling_s=t1 - t0,
                   time_reward_s=t2 - t1,
                   time_reference_s=time.perf_counter() - t2)
    return batch, metrics

  def _log_replies(self, step, group_problems, replies, finish, rewards, parts):
    """The first log_samples replies of the batch (the first prompts' groups) as lines of
    MODEL_DIR/samples.jsonl: what the policy writes and what each reward gave it."""
    if self._samples_log is None:
      return
    for i in range(min(self.log_samples, len(replies))):
      rec = {"step": step, "task_id": group_problems[i].task_id, "reply": replies[i],
             "finish": finish[i], "reward": float(rewards[i])}
      rec.update({k: float(v[i]) for k, v in parts.items()})
      self._samples_log.write(json.dumps(rec, ensure_ascii=False) + "\n")
    self._samples_log.flush()

  def _layout(self, prompts, out) -> dict:
    """[rows, seq_len] rows of prompt + response: targets are the next tokens; mask and
    old_logp cover the response tokens (the closing EOS included). Each prompt is padded on the
    left (segment 0) to end at column prompt_slot, so every response starts at prompt_slot - 1
    and the log-probabilities skip the columns before it."""
    r, t = len(prompts), self.seq_len
    b = {k: np.zeros((r, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions",
                                                  "mask")}
    b["old_logp"] = np.zeros((r, t), np.float32)
    for i, (p, toks, lps, fin, eos_lp) in enumerate(zip(prompts, out.tokens, out.logprobs,
                                                        out.finish_reason, out.eos_logprob)):
      resp = list(toks) + ([self.eos] if fin == "eos" else [])
      resp_lp = list(lps) + ([eos_lp] if fin == "eos" else [])
      ids = p + resp
      o = self.prompt_slot - len(p)
      n = len(ids) - 1
      if o < 0 or o + n > t:
        raise ValueError(f"grpo: a prompt of {len(p)} tokens + {len(resp)} response tokens "
                         f"does not fit the prompt slot {self.prompt_slot} + max_new_tokens "
                         f"{self.max_new}")
      b["inputs"][i, o:o + n] = ids[:-1]
      b["targets"][i, o:o + n] = ids[1:]
      b["segment_ids"][i, o:o + n] = 1
      b["positions"][i, o:o + n] = np.arange(n)
      b["mask"][i, self.prompt_slot - 1:o + n] = 1
      b["old_logp"][i, self.prompt_slot - 1:o + n] = resp_lp
    return b


def row_len(prompt_slot: int, max_new_tokens: int) -> int:
  """Columns of a GRPO row: the prompt slot and the response, less the last target's input."""
  return prompt_slot + max_new_tokens - 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ProblemPrompts:
  """The problems GRPO samples for (coder_jax/problems; default: the built-in train split)."""
  path: str | None = None
  split: str | None = "train"
  tokenizer: str = gin.REQUIRED
  max_prompt_tokens: int | None = None   # longer prompts are left out (counted)


@gin.configurable
def grpo(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
         prompts_per_step: int = gin.REQUIRED, group_size: int = 4, seq_len: int = 512,
         max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
         eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.04,
         aggregation: str = "token_mean", updates_per_batch: int = 1,
         scale_rewards: str = "group", log_samples: int = 4,
         prompts: ProblemPrompts = gin.REQUIRED, reward: RewardConfig = RewardConfig(),
         mesh_config: MeshConfig | None = None, optimizer_config: OptimizerConfig | None = None,
         balance_loss: BalanceLossConfig | None = None, compute_dtype: str = "bfloat16",
         seed: int = 0, init_from_hf: str | None = None, init_from_checkpoint: str | None = None,
         init_step: int | None = None, checkpoint_every: int = 50,
         keep_checkpoints: int | None = 3, async_checkpoints: bool = True, log_every: int = 1,
         progress_every_s: float = 30.0,
         max_consecutive_nonfinite: int = 5, stop_after: int | None = None,
         dry_run: bool = False, dry_run_devices: int | None = None, aot=None):
  """GRPO from a policy (init_from_checkpoint: an SFT run's MODEL_DIR, or init_from_hf); one
  step is one policy update on prompts_per_step x group_size samples. A row is the run's longest
  prompt (others padded on the left) + max_new_tokens - 1 tokens; seq_len bounds it (prompts
  that would exceed it are left out and counted). dry_run: the mesh and
  per-device memory of the policy's train state (the reference and reward model come on top).
  aot: compile the policy's train step and the sampler for a TPU topology instead
  (--compile_topology, train/aot.py), prompts at their longest (seq_len - max_new_tokens + 1)."""
  if not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"grpo: group_size must be >= 2 (advantages compare a prompt's samples); "
                     f"got {group_size}")
  if scale_rewards not in ADVANTAGE_SCALES:
    raise ValueError(f"grpo: scale_rewards must be one of {ADVANTAGE_SCALES} (A = (r - mean) / "
                     f"std within each group, or r - mean); got {scale_rewards!r}")
  if not isinstance(log_samples, int) or log_samples < 0:
    raise ValueError(f"grpo: log_samples must be an int >= 0 (replies per step written to "
                     f"MODEL_DIR/samples.jsonl); got {log_samples!r}")
  if updates_per_batch < 1 or prompts_per_step < 1:
    raise ValueError("grpo: updates_per_batch and prompts_per_step must be >= 1")
  if not (init_from_hf or init_from_checkpoint):
    raise ValueError("grpo: start from a policy: set grpo.init_from_checkpoint (an SFT run's "
                     "MODEL_DIR) or grpo.init_from_hf")
  reward.check()
  from coder_jax import problems as problem_set
  from coder_jax.data.tokenizer import load_tokenizer
  cfg = loop.resolve_model_config(init_from_hf, compute_dtype, init_from_checkpoint, init_step,
                                  dry_run=dry_run)
  if dry_run:
    from coder_jax.stages.pretrain import dry_run_report
    optimizer, schedule = make_optimizer(optimizer_config or OptimizerConfig(), train_steps)
    if aot is not None:
      from coder_jax.train.aot import compile_train_step
      from coder_jax.train.flops import train_flops_per_token
      slot = seq_len - max_new_tokens + 1
      objective = grpo_objective(cfg, temperature=temperature, eps_low=eps_low,
                                 eps_high=eps_high, beta=beta, aggregation=aggregation,
                                 alphas=balance_loss or BalanceLossConfig(0.0, 0.0, 0.0),
                                 start=slot - 1, group=group_size)
      return compile_train_step(
          aot, cfg=cfg, mesh_cfg=mesh_config or MeshConfig(), optimizer=optimizer,
          schedule=schedule, objective=objective,
          make_step=lambda gd: make_step(gd, optimizer, schedule, objective),
          batch_size=prompts_per_step * group_size, seq_len=row_len(slot, max_new_tokens),
          flops_per_token=train_flops_per_token(cfg, seq_len), stage="grpo",
          decode=dict(rows=prompts_per_step * group_size, prompt_len=slot,
                      max_new_tokens=max_new_tokens, group=group_size))
    return dry_run_report(cfg, mesh_config or MeshConfig(), optimizer,
                          num_devices=dry_run_devices or jax.device_count(),
                          batch_size=prompts_per_step * group_size, seq_len=seq_len,
                          grad_accum_steps=1)
  tok = load_tokenizer(prompts.tokenizer)
  n_tok = tok.get_vocab_size(with_added_tokens=True)
  if n_tok > cfg.vocab_size:
    raise ValueError(f"grpo: the tokenizer {prompts.tokenizer} has {n_tok} tokens but the "
                     f"policy's vocab_size is {cfg.vocab_size}; it is not this policy's tokenizer")
  items, skipped = problem_set.load(prompts.path, split=prompts.split)
  # A row holds the prompt (BOS included) and max_new_tokens, less the last target's input.
  limit = seq_len - max_new_tokens + 1
  if prompts.max_prompt_tokens:
    limit = min(limit, prompts.max_prompt_tokens)
  lengths = [1 + len(tok.encode(prompt_text(p), add_special_tokens=False).ids) for p in items]
  fits = [p for p, n in zip(items, lengths) if n <= limit]
  if not fits:
    raise ValueError(f"grpo: no problem's prompt fits in {limit} tokens (seq_len {seq_len} - "
                     f"max_new_tokens {max_new_tokens} + 1, or ProblemPrompts.max_prompt_tokens)")
  # Every batch pads its prompts to the longest one of the run: one sampler program, and the
  # responses start at one column, where the log-probabilities start.
  prompt_slot = max(n for n in lengths if n <= limit)
  seq_len = row_len(prompt_slot, max_new_tokens)
  print(f"grpo: {len(fits)} problems ({len(items) - len(fits)} prompts too long, "
        f"{sum(skipped.values())} malformed records skipped)", flush=True)
  alphas = balance_loss or BalanceLossConfig(0.0, 0.0, 0.0)
  optimizer, schedule = make_optimizer(optimizer_config or OptimizerConfig(), train_steps)
  mesh = make_mesh(mesh_config or MeshConfig())
  batch_size = prompts_per_step * group_size
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=1, seq_len=seq_len)
  init = lambda: loop.initial_params(cfg, mesh, init_from_hf=init_from_hf,
                                     init_from_checkpoint=init_from_checkpoint,
                                     init_step=init_step)
  graphdef, _ = train_state.abstract_model(cfg)
  ref_fn = (_reference(graphdef, cfg, init(), temperature, prompt_slot - 1, group_size)
            if beta else None)
  scorer = None
  if reward.rm_weight:
    from coder_jax.reward import load as load_reward_model
    # On the training mesh: the rewards are scored inside it (jax.set_mesh), where a jit takes
    # no parameters committed to one device.
    scorer = load_reward_model(reward.reward_model, mesh=mesh)
  objective = grpo_objective(cfg, temperature=temperature, eps_low=eps_low, eps_high=eps_high,
                             beta=beta, aggregation=aggregation, alphas=alphas,
                             start=prompt_slot - 1, group=group_size)
  data = _RolloutData(dict(problems=fits, tokenizer=tok,
                           tokenizer_path=os.path.abspath(prompts.tokenizer), graphdef=graphdef, cfg=cfg,
                           mesh=mesh, global_rows=batch_size, group_size=group_size,
                           prompt_slot=prompt_slot, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, reward=reward, scorer=scorer,
                           ref_logp=ref_fn, updates=updates_per_batch, seed=seed,
                           scale_rewards=scale_rewards, log_samples=log_samples,
                           samples_path=(os.path.join(model_dir, "samples.jsonl")
                                         if jax.process_index() == 0 else None)))
  return loop.run(
      model_dir=model_dir, cfg=cfg, optimizer=optimizer, schedule=schedule, mesh=mesh,
      objective=objective, data=data, batch_size=batch_size, seq_len=seq_len,
      train_steps=train_steps, seed=seed,
      make_step=lambda gd: make_step(gd, optimizer, schedule, objective), params=init,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      async_checkpoints=async_checkpoints, log_every=log_every,
      progress_every_s=progress_every_s,
      max_consecutive_nonfinite=max_consecutive_nonfinite, stop_after=stop_after)


class _RolloutData:
  """The loop's data protocol around Rollouts."""

  def __init__(self, kw):
    self.kw = kw

  def open(self, *, model_vocab, batch_rows, seq_len, shard, num_shards, start_batch):
    del model_vocab, num_shards
    if batch_rows % self.kw["group_size"]:
      raise ValueError(f"grpo: each host's {batch_rows} rows must hold whole groups of "
                       f"{self.kw['group_size']}")
    return Rollouts(**self.kw, rows=batch_rows, shard=shard, start_batch=start_batch)


def _reference(graphdef, cfg, params, temperature, start: int = 0, group: int = 1):
  """Frozen reference log-probabilities of a batch's targets (the policy GRPO starts from),
  from position `start` on; group as grpo_objective's."""

  @jax.jit
  def fn(p, inputs, targets, segment_ids, positions):
    return token_logprobs(nnx.merge(graphdef, p), inputs, targets, segment_ids, positions,
                          temperature=temperature, start=start, group=group)

  def ref_logp(batch):
    """Dispatches the forward and returns its (not yet ready) [rows, seq] array; positions
    outside the mask are not zeroed here."""
    return fn(params, *(jnp.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids",
                                                         "positions")))

  return ref_logp
