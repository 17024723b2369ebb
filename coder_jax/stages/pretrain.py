"""Pretraining (and continued pretraining from a Hugging Face checkpoint or another run, the
long-context stages included) on a device mesh: the language-model objective in the shared loop
(coder_jax/train/loop.py); gin picks every value (gin_configs/runs/pretrain.gin,
gin_configs/runs/long_context.gin). Returns a summary dict (used by tests); writes checkpoints,
metrics.jsonl, TensorBoard events and config.gin under MODEL_DIR.
"""

from __future__ import annotations

import gin
import jax

from coder_jax.model.info import param_counts
from coder_jax.parallel.mesh import MeshConfig, abstract_mesh, batch_shards, check_fit, make_mesh
from coder_jax.train import loop
from coder_jax.train import state as train_state
from coder_jax.train.data import SyntheticData
from coder_jax.train.flops import train_flops_per_token
from coder_jax.train.loop import (NonFiniteLossError, check_positions,  # noqa: F401
                                  resolve_model_config)
from coder_jax.train.losses import BalanceLossConfig
from coder_jax.train.optim import OptimizerConfig, make_optimizer
from coder_jax.train.step import check_loss_chunk_size, lm_objective, make_train_step


def check_balance(cfg, alphas: BalanceLossConfig):
  """The device-level and communication losses need device groups to balance."""
  if cfg.has_moe and cfg.routing_devices == 1 and (alphas.device_alpha or alphas.comm_alpha):
    raise ValueError(
        "balance_loss: device_alpha / comm_alpha are set but model_config.routing_devices is 1, "
        "so both losses would be constants; set routing_devices to the expert-parallel device "
        "count (or a multiple of it) or the alphas to 0")


def _gb(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB"


def logits_bytes_per_device(cfg, mesh, *, batch_size: int, grad_accum_steps: int,
                            positions: int) -> int:
  """Bytes of one float32 [rows, positions, vocab] logits buffer on a device: its rows of a
  micro-batch, its share of the vocabulary (the tensor axis, when it divides)."""
  rows = -(-(batch_size // grad_accum_steps) // batch_shards(mesh))
  tensor = mesh.shape["tensor"]
  vocab = cfg.vocab_size // tensor if cfg.vocab_size % tensor == 0 else cfg.vocab_size
  return rows * positions * vocab * 4


def _positions_line(cfg) -> str:
  y = cfg.rope_scaling
  rope = ("RoPE without scaling" if y is None else
          f"YaRN factor {y.factor:g} from {y.original_max_position_embeddings} positions")
  return f"positions            {rope}; max_position_embeddings {cfg.max_position_embeddings}"


def dry_run_report(cfg, mesh_cfg: MeshConfig, optimizer, *, num_devices: int, batch_size: int,
                   seq_len: int, grad_accum_steps: int, loss_chunk_size: int | None = None) -> dict:
  mesh = abstract_mesh(mesh_cfg, num_devices)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
            seq_len=seq_len)
  _, abstract, specs = train_state.state_specs(cfg, optimizer, mesh)
  shape = dict(mesh.shape)
  p_bytes = train_state.bytes_per_device(abstract["params"], specs["params"], shape)
  o_bytes = train_state.bytes_per_device(abstract["opt_state"], specs["opt_state"], shape)
  counts = param_counts(cfg)
  # The loss's logits at once: its balanced chunks (logprobs._position_chunks) are at most
  # loss_chunk_size.
  chunks = -(-seq_len // loss_chunk_size) if loss_chunk_size else 1
  logits_kw = dict(batch_size=batch_size, grad_accum_steps=grad_accum_steps)
  l_bytes = logits_bytes_per_device(cfg, mesh, positions=-(-seq_len // chunks), **logits_kw)
  l_whole = logits_bytes_per_device(cfg, mesh, positions=seq_len, **logits_kw)
  report = {"total_params": counts["total"], "active_params": counts["active"],
            "mesh": shape, "num_devices": num_devices, "params_bytes_per_device": p_bytes,
            "opt_state_bytes_per_device": o_bytes, "state_bytes_per_device": p_bytes + o_bytes,
            "loss_logits_bytes_per_device": l_bytes, "unchunked_logits_bytes_per_device": l_whole,
            "rope_scaling": cfg.rope_scaling,
            "max_position_embeddings": cfg.max_position_embeddings,
            "train_flops_per_token": train_flops_per_token(cfg, seq_len)}
  chunk_note = (f"chunks of {-(-seq_len // chunks)} positions (loss_chunk_size "
                f"{loss_chunk_size}; whole sequence: {_gb(l_whole)})" if chunks > 1
                else "the whole sequence at once" + (" (loss_chunk_size unset)"
                                                      if loss_chunk_size is None else ""))
  lines = [
      f"model                {counts['total'] / 1e9:,.2f}B parameters, "
      f"{counts['active'] / 1e9:,.2f}B active per token; compute {cfg.dtype}, master float32",
      f"mesh                 {' '.join(f'{k}={v}' for k, v in shape.items())} "
      f"({num_devices} devices)",
      f"batch                {batch_size} x {seq_len} tokens "
      f"({grad_accum_steps} micro-batch{'es' if grad_accum_steps > 1 else ''})",
      f"per device           parameters {_gb(p_bytes)} + optimizer state {_gb(o_bytes)} = "
      f"{_gb(p_bytes + o_bytes)} (float32; activations not included)",
      f"loss logits          {_gb(l_bytes)} per device, float32, {chunk_note}; the backward "
      "holds about two such buffers",
      _positions_line(cfg),
      f"train FLOPs / token  {report['train_flops_per_token'] / 1e9:,.2f} GFLOP",
  ]
  print("\n".join(lines))
  return report


def train_lm(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
             batch_size: int = gin.REQUIRED, seq_len: int = gin.REQUIRED,
             data=SyntheticData(), mesh_config: MeshConfig | None = None,
             optimizer_config: OptimizerConfig | None = None,
             balance_loss: BalanceLossConfig | None = None, grad_accum_steps: int = 1,
             compute_dtype: str = "bfloat16", seed: int = 0, init_from_hf: str | None = None,
             init_from_checkpoint: str | None = None, init_step: int | None = None,
             checkpoint_every: int = 100, keep_checkpoints: int | None = 3,
             async_checkpoints: bool = True, log_every: int = 1,
             progress_every_s: float = 30.0,
             max_consecutive_nonfinite: int = 5, nan_injection_steps: tuple = (),
             peak_tflops_per_device: float | None = None, dry_run: bool = False,
             dry_run_devices: int | None = None, stop_after: int | None = None,
             model_overrides: dict | None = None, loss_chunk_size: int | None = None,
             aot=None):
  """Train a causal LM until `train_steps` (resuming from the latest checkpoint in MODEL_DIR).

  A fresh run starts from `seed`, from a Hugging Face checkpoint (init_from_hf), or from the
  parameters of another run's MODEL_DIR (init_from_checkpoint; its latest step unless
  init_step; the optimizer starts afresh). stop_after: leave after this many steps of this
  process (a checkpoint is saved), e.g. to split a long run into jobs. nan_injection_steps:
  steps whose loss is made NaN (tests the non-finite guard).

  model_overrides: {'rope_scaling': {YaRN fields} or None, 'max_position_embeddings': n} laid
  over the architecture the run starts from (a long-context stage; both or neither). A
  seq_len beyond max_position_embeddings is an error. loss_chunk_size: compute the loss's
  logits this many positions at a time (train/step.py lm_objective). aot: compile the train
  step for a TPU topology instead (--compile_topology, train/aot.py)."""
  mesh_cfg = mesh_config or MeshConfig()
  opt_cfg = optimizer_config or OptimizerConfig()
  alphas = balance_loss or BalanceLossConfig()
  check_loss_chunk_size(loss_chunk_size)
  cfg = resolve_model_config(init_from_hf, compute_dtype, init_from_checkpoint, init_step,
                             dry_run=dry_run, model_overrides=model_overrides)
  check_positions(cfg, seq_len, None if model_overrides else init_from_hf or init_from_checkpoint)
  optimizer, schedule = make_optimizer(opt_cfg, train_steps)
  if dry_run:
    check_balance(cfg, alphas)
    if aot is not None:
      from coder_jax.train.aot import compile_train_step
      return compile_train_step(
          aot, cfg=cfg, mesh_cfg=mesh_cfg, optimizer=optimizer, schedule=schedule,
          objective=lm_objective(cfg, alphas, loss_chunk_size=loss_chunk_size),
          make_step=lambda graphdef: make_train_step(
              graphdef, cfg, optimizer, schedule, alphas=alphas,
              grad_accum_steps=grad_accum_steps, loss_chunk_size=loss_chunk_size),
          batch_size=batch_size, seq_len=seq_len, grad_accum_steps=grad_accum_steps,
          flops_per_token=train_flops_per_token(cfg, seq_len), stage="pretrain")
    return dry_run_report(cfg, mesh_cfg, optimizer, num_devices=dry_run_devices or jax.device_count(),
                          batch_size=batch_size, seq_len=seq_len, grad_accum_steps=grad_accum_steps,
                          loss_chunk_size=loss_chunk_size)
  if train_steps < 1 or checkpoint_every < 1:
    raise ValueError("pretrain: train_steps and checkpoint_every must be >= 1")
  mesh = make_mesh(mesh_cfg)
  check_fit(mesh, cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
            seq_len=seq_len)
  check_balance(cfg, alphas)
  return loop.run(
      model_dir=model_dir, cfg=cfg, optimizer=optimizer, schedule=schedule, mesh=mesh,
      objective=lm_objective(cfg, alphas, loss_chunk_size=loss_chunk_size), data=data,
      batch_size=batch_size, seq_len=seq_len, train_steps=train_steps, seed=seed,
      make_step=lambda graphdef: make_train_step(graphdef, cfg, optimizer, schedule,
                                                 alphas=alphas, grad_accum_steps=grad_accum_steps,
                                                 loss_chunk_size=loss_chunk_size),
      params=lambda: loop.initial_params(cfg, mesh, init_from_hf=init_from_hf,
                                         init_from_checkpoint=init_from_checkpoint,
                                         init_step=init_step),
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
      async_checkpoints=async_checkpoints, log_every=log_every,
      progress_every_s=progress_every_s,
      max_consecutive_nonfinite=max_consecutive_nonfinite,
      nan_injection_steps=nan_injection_steps,
      flops_per_token=train_flops_per_token(cfg, seq_len),
      peak_tflops_per_device=peak_tflops_per_device, stop_after=stop_after)


# One implementation, two stage names: pretraining (the code mixture) and SFT (ChatData: the same
# next-token objective with loss_weights on the assistant tokens only); their gin files differ.
pretrain = gin.external_configurable(train_lm, name="pretrain")
sft = gin.external_configurable(train_lm, name="sft")
