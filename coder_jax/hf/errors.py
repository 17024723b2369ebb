"""The one error type of coder_jax.hf's readers (its own module so every submodule can raise it)."""


class CheckpointError(ValueError):
  """A checkpoint that does not match its config (names the tensor or field)."""
