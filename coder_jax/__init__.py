"""coder_jax: a JAX/Flax training stack for DeepSeek-Coder-V2-style code models."""

__version__ = "0.1.0"
