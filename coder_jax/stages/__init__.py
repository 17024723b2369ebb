"""Runnable stages (thin: they wire library pieces together). `launch` runs the gin-chosen one."""

import inspect

import gin


@gin.configurable
def launch(stage=gin.REQUIRED, dry_run: bool = False, aot=None):
  """Run the stage a run config names, e.g. `launch.stage = @pretrain`. aot: a
  coder_jax.train.aot.CompileRequest (--compile_topology): compile the stage's train step for a
  TPU topology instead of training."""
  name = getattr(stage, "__name__", stage)
  if aot is not None:
    if "aot" not in inspect.signature(stage).parameters:
      raise ValueError(f"--compile_topology: stage {name!r} has no train step to compile")
    return stage(dry_run=True, aot=aot)
  if dry_run:
    if "dry_run" not in inspect.signature(stage).parameters:
      raise ValueError(f"--dry_run: stage {getattr(stage, '__name__', stage)!r} has no dry run")
    return stage(dry_run=True)
  return stage()


def register_all():
  """Import every stage module so their gin configurables exist before parsing."""
  from coder_jax.stages import demo, grpo, pretrain, reward_model  # noqa: F401
  from coder_jax.train import data, losses, optim  # noqa: F401
  from coder_jax.data import chat  # noqa: F401
  from coder_jax.parallel import mesh  # noqa: F401
