"""Runnable stages (thin: they wire library pieces together). `launch` runs the gin-chosen one."""

import gin


@gin.configurable
def launch(stage=gin.REQUIRED):
  """Run the stage a run config names, e.g. `launch.stage = @model_demo`."""
  return stage()


def register_all():
  """Import every stage module so their gin configurables exist before parsing."""
  from coder_jax.stages import demo  # noqa: F401
