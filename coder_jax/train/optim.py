"""AdamW and the learning-rate schedules of DeepSeek-V2 / DeepSeek-Coder-V2.

  cosine: linear warm-up to the peak, then cosine decay to final_fraction x peak (Coder-V2: 10%)
  step:   linear warm-up, then x step_factor at each boundary fraction of the run
          (V2: x0.316 at 60% and 90% of the steps)
  constant: warm-up, then the peak
Master weights and both Adam moments are float32 (the parameters are stored float32; the model
casts them to the compute dtype inside each matmul).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "step", "constant")


@gin.configurable("optimizer_config")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 4.2e-4
  schedule: str = "cosine"
  warmup_steps: int = 2000
  final_fraction: float = 0.1
  step_boundaries: tuple[float, ...] = (0.6, 0.9)
  step_factor: float = 0.316
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer_config.schedule: {self.schedule!r} is not one of {SCHEDULES}")
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      raise ValueError("optimizer_config: learning_rate must be > 0 and warmup_steps >= 0")
    if any(not 0 < b < 1 for b in self.step_boundaries):
      raise ValueError(f"optimizer_config.step_boundaries: fractions in (0, 1), got "
                       f"{self.step_boundaries}")


def make_schedule(cfg: OptimizerConfig, total_steps: int):
  """step -> learning rate, from optax's schedule combinators: a linear ramp to the peak over the
  warm-up (step 0 already at peak / warmup_steps), then the schedule, counted from the warm-up's
  end (the step boundaries are fractions of the whole run)."""
  peak, warm = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(total_steps - warm, 1), alpha=cfg.final_fraction)
  else:
    scales: dict[int, float] = {}
    for b in cfg.step_boundaries:     # two fractions landing on one step multiply
      at = max(round(b * total_steps) - warm, 0)
      scales[at] = scales.get(at, 1.0) * cfg.step_factor
    after = optax.piecewise_constant_schedule(peak, scales)
  if not warm:
    return after
  ramp = optax.linear_schedule(peak / warm, peak, warm - 1)
  return optax.join_schedules([ramp, after], [warm])


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  schedule = make_schedule(cfg, total_steps)
  chain = []
  if cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def decay_mask(params):
  """Decay every weight matrix; leave 1-d norm scales (stacked: 2-d under `layers`) alone."""
  def one(path, p):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return not any(isinstance(n, str) and ("layernorm" in n or n == "norm") for n in names)
  return jax.tree_util.tree_map_with_path(one, params)
