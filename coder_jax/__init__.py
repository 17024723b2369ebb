"""coder_jax: a JAX/Flax training stack for DeepSeek-Coder-V2-style code models."""

__version__ = "0.1.0"

from coder_jax.runtime import keep_host_memory as _keep_host_memory

_keep_host_memory()


def generate(model, tokenizer, prompts, **kwargs):
  """Text completions with the latent KV cache; see `coder_jax.decode.generate`."""
  from coder_jax.decode import generate as _generate
  return _generate(model, tokenizer, prompts, **kwargs)
