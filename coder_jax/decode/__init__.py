"""Decoding with MLA's latent KV cache: prefill, jitted single-token steps, sampling.

  generate(model, tokenizer, prompts, ...)     text completions (also `coder_jax.generate`)
  generate_ids(model, prompt_ids, ...)         token level
  load(checkpoint)                             (model, tokenizer) from an HF or training dir
  python -m coder_jax.decode --checkpoint DIR --prompt "def fib(n):"
Imports only jax, flax and numpy (the tokenizer is passed in).
"""

from coder_jax.decode.api import cut_at_stop, generate, load
from coder_jax.decode.cache import LatentCache, cache_bytes_per_token, values_per_token
from coder_jax.decode.generate import Generated, generate_ids, prefill
from coder_jax.decode.sampling import filter_logits, sample

__all__ = ["Generated", "LatentCache", "cache_bytes_per_token", "cut_at_stop", "filter_logits",
           "generate", "generate_ids", "load", "prefill", "sample", "values_per_token"]
