"""The reward model on execution feedback (DeepSeek-Coder-V2 trains its code RM on the tests'
0-1 signal): a policy's backbone plus a scalar head (model/reward.py), trained pointwise (binary
cross-entropy on {"prompt", "response", "passed"}) or pairwise (Bradley-Terry on {"prompt",
"chosen", "rejected"}) in the shared loop; gin picks every value (gin_configs/runs/
reward_model.gin). At every checkpoint the held-out prompts' accuracy, ROC AUC and calibration
(ECE) are logged as eval_*. Records come from `python -m coder_jax.reward build`; the trained
RM is read by `coder_jax.reward.load(MODEL_DIR)` and exported by `python -m coder_jax.reward
export`.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from coder_jax.model.reward import RewardModel, params_from_policy
from coder_jax.parallel.mesh import MeshConfig, check_fit, make_mesh
from coder_jax.parallel.rules import logical_to_spec
from coder_jax.reward.data import RewardData
from coder_jax.stages.pretrain import check_balance, dry_run_report
from coder_jax.train import loop
from coder_jax.train.flops import train_flops_per_token
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.optim import OptimizerConfig, make_optimizer
from coder_jax.train.reward_losses import (SEQUENCE_KEYS, pairwise_metrics, pairwise_objective,
                                           pointwise_objective, reward_metrics, roc_auc)
from coder_jax.train.step import TOKEN_AXES, make_step

OBJECTIVES = {"pointwise": pointwise_objective, "pairwise": pairwise_objective}


def backbone_config(cfg):
  """The config whose causal LM is the RM's backbone: tied embeddings build no LM head (as
  RewardModel does), so parameter counts, memory and FLOPs are the RM's (its D x 1 head aside)."""
  return cfg.replace(tie_word_embeddings=True)


def _is_reward_export(path: str) -> bool:
  from coder_jax.hf import read_config_json, seq_cls
  return seq_cls.ARCHITECTURE in (read_config_json(path).get("architectures") or ())


def start_params(cfg, mesh, *, init_from_hf=None, init_from_checkpoint=None, init_step=None,
                 seed: int = 0, head_std: float = 0.0) -> dict:
  """The parameters a fresh run starts from: a policy's backbone with a fresh head, or all of
  an earlier reward model (its training MODEL_DIR or HF export) to train on."""
  from coder_jax.reward.scorer import has_reward_head, train_dir_model
  runtime = {f: getattr(cfg, f) for f in loop.RUNTIME_FIELDS + loop.POSITION_FIELDS}
  rm = None
  if init_from_checkpoint and has_reward_head(init_from_checkpoint, init_step):
    rm = train_dir_model(init_from_checkpoint, init_step, mesh=mesh, **runtime)
  elif init_from_hf and _is_reward_export(init_from_hf):
    from coder_jax.hf import seq_cls
    rm = seq_cls.load(init_from_hf, jnp.float32, mesh=mesh, compute_dtype=cfg.dtype,
                      **{k: v for k, v in runtime.items() if k != "dtype"})
  if rm is not None:
    print(f"initialised from the reward model {init_from_checkpoint or init_from_hf}",
          flush=True)
    return nnx.to_pure_dict(nnx.state(rm, nnx.Param))
  policy = loop.initial_params(cfg, mesh, init_from_hf=init_from_hf,
                               init_from_checkpoint=init_from_checkpoint, init_step=init_step)
  print(f"reward head: fresh (std {head_std}, seed {seed})", flush=True)
  return params_from_policy(policy, cfg, seed=seed, head_std=head_std)


class HeldOutEval:
  """evaluate(graphdef, state) for the loop: scores the held-out rows with the current
  parameters (batch_rows at a time, placed like training batches) and returns reward_metrics
  (pointwise) or pairwise_metrics plus the AUC of chosen against rejected (pairwise)."""

  def __init__(self, heldout: dict, objective: str, mesh, batch_rows: int):
    self.heldout, self.objective, self.mesh, self.rows = heldout, objective, mesh, batch_rows
    self._fn = None

  def _scores(self, params, prefix: str) -> np.ndarray:
    n = len(self.heldout["row_weights"])
    out = np.zeros(n, np.float32)
    for at in range(0, n, self.rows):
      chunk = []
      for k in SEQUENCE_KEYS:
        x = self.heldout[prefix + k][at:at + self.rows]
        x = np.pad(x, ((0, self.rows - len(x)), (0, 0)))   # empty rows: scored, then dropped
        spec = logical_to_spec(TOKEN_AXES, x.shape, self.mesh)
        chunk.append(jax.device_put(x, NamedSharding(self.mesh, spec)))
      out[at:at + self.rows] = np.asarray(self._fn(params, *chunk))[:n - at]
    return out

  def __call__(self, graphdef, state) -> dict:
    if self._fn is None:
      # Replicated scores: every host reads them whole.
      self._fn = jax.jit(lambda p, ids, seg, pos: nnx.merge(graphdef, p)(ids, seg, pos),
                         out_shardings=NamedSharding(self.mesh, P()))
    params = state["params"]
    if self.objective == "pointwise":
      return reward_metrics(self._scores(params, ""), self.heldout["labels"])
    chosen, rejected = self._scores(params, "chosen_"), self._scores(params, "rejected_")
    both = np.concatenate([chosen, rejected])
    labels = np.concatenate([np.ones_like(chosen), np.zeros_like(rejected)])
    # No ECE: Bradley-Terry fixes score differences only, so σ(score) is no probability.
    return {**pairwise_metrics(chosen, rejected), "auc": roc_auc(both, labels)}


@gin.configurable
def reward_model(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
                 batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED,
                 data: RewardData = gin.REQUIRED, mesh_config: MeshConfig | None = None,
                 optimizer_config: OptimizerConfig | None = None,
                 balance_loss: BalanceLossConfig | None = None, grad_accum_steps: int = 1,
                 compute_dtype: str = "bfloat16", seed: int = 0,
                 init_from_hf: str | None = None, init_from_checkpoint: str | None = None,
                 init_step: int | None = None, head_std: float = 0.0, evaluate: bool = True,
                 checkpoint_every: int = 100, keep_checkpoints: int | None = 3,
                 async_checkpoints: bool = True, log_every: int = 1,
                 progress_every_s: float = 30.0,
                 max_consecutive_nonfinite: int = 5, peak_tflops_per_device: float | None = None,
                 dry_run: bool = False, dry_run_devices: int | None = None,
                 stop_after: int | None = None, aot=None):
  """Train a reward model until `train_steps` (resuming from MODEL_DIR's latest checkpoint).

  A fresh run starts from a policy (init_from_checkpoint: an SFT run's MODEL_DIR, latest step
  unless init_step; or init_from_hf): its backbone, a head of std head_std (0: every score
  starts at 0); or from an earlier reward model's directory or export, head included.
  batch_size counts rows: examples (pointwise) or pairs (pairwise, two sequences each).
  evaluate: held-out metrics at every checkpoint (needs a non-empty held-out split). aot: compile
  the train step for a TPU topology instead (--compile_topology, train/aot.py)."""
  mesh_cfg = mesh_config or MeshConfig()
  alphas = balance_loss or BalanceLossConfig()
  cfg = loop.resolve_model_config(init_from_hf, compute_dtype, init_from_checkpoint, init_step,
                                  dry_run=dry_run)
  loop.check_positions(cfg, seq_len, init_from_hf or init_from_checkpoint)
  optimizer, schedule = make_optimizer(optimizer_config or OptimizerConfig(), train_steps)
  sides = 2 if data.objective == "pairwise" else 1
  if dry_run:
    check_balance(cfg, alphas)
    if aot is not None:
      from coder_jax.train.aot import compile_train_step
      objective = OBJECTIVES[data.objective](cfg, alphas)
      return compile_train_step(
          aot, cfg=cfg, mesh_cfg=mesh_cfg, optimizer=optimizer, schedule=schedule,
          objective=objective, model_cls=RewardModel,
          make_step=lambda graphdef: make_step(graphdef, optimizer, schedule, objective,
                                               grad_accum_steps=grad_accum_steps),
          batch_size=batch_size, seq_len=seq_len, grad_accum_steps=grad_accum_steps,
          flops_per_token=sides * train_flops_per_token(backbone_config(cfg), seq_len),
          stage="reward_model")
    report = dry_run_report(backbone_config(cfg), mesh_cfg, optimizer,
                            num_devices=dry_run_devices or jax.device_count(),
                            batch_size=batch_size, seq_len=seq_len,
                            grad_accum_steps=grad_accum_steps)
    print(f"reward model         {data.objective}: the backbone above + a {cfg.hidden_size} x 1 "
          "score head; its loss reads one score per row, so no vocabulary logits"
          + (f"; each row a pair: {2 * batch_size} sequences a step" if sides == 2 else ""))
    return report
  if not (init_from_hf or init_from_checkpoint):
    raise ValueError("reward_model: start from a policy: set reward_model.init_from_checkpoint "
                     "(an SFT run's MODEL_DIR) or reward_model.init_from_hf")
  if train_steps < 1 or checkpoint_every < 1:
    raise ValueError("reward_model: train_steps and checkpoint_every must be >= 1")
  examples = data.load(seq_len)     # every record read once; the loop streams from it
  examples.check_vocab(cfg.vocab_size)
  heldout = None
  if evaluate:
    heldout = examples.heldout_batch()
    if not len(heldout["row_weights"]):
      raise ValueError(f"reward_model: the held-out split of {examples.path} is empty (no prompt "
                       f"hashed below RewardData.heldout_fraction = {data.heldout_fraction}); "
                       "raise it, add prompts, or set reward_model.evaluate = False")
  mesh = make_mesh(mesh_cfg)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
            seq_len=seq_len)
  check_balance(cfg, alphas)
  objective = OBJECTIVES[data.objective](cfg, alphas)
  return loop.run(
      model_dir=model_dir, cfg=cfg, optimizer=optimizer, schedule=schedule, mesh=mesh,
      objective=objective, data=examples, batch_size=batch_size, seq_len=seq_len,
      train_steps=train_steps, seed=seed, model_cls=RewardModel,
      make_step=lambda graphdef: make_step(graphdef, optimizer, schedule, objective,
                                           grad_accum_steps=grad_accum_steps),
      params=lambda: start_params(cfg, mesh, init_from_hf=init_from_hf,
                                  init_from_checkpoint=init_from_checkpoint,
                                  init_step=init_step, seed=seed, head_std=head_std),
      evaluate=None if heldout is None else HeldOutEval(heldout, data.objective, mesh,
                                                        batch_size),
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      async_checkpoints=async_checkpoints, log_every=log_every,
      progress_every_s=progress_every_s,
      max_consecutive_nonfinite=max_consecutive_nonfinite,
      # The loop counts batch_size x seq_len tokens a step; a pair row holds two sequences.
      flops_per_token=sides * train_flops_per_token(backbone_config(cfg), seq_len),
      peak_tflops_per_device=peak_tflops_per_device, stop_after=stop_after)
