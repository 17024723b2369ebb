"""Sanity check on an accelerator: logits at position t do not change when tokens after t do
(causal masking), for the Lite-width proxy in bf16 with the configured implementations.

    python benchmarks/causality_check.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax
import jax.numpy as jnp
import numpy as np

from coder_jax.model.config import get_config
from coder_jax.model.decoder import init_model


def main():
  for impl in ("tiled", "ragged"):
    cfg = get_config("coder_v2_lite", num_hidden_layers=2, dtype="bfloat16", moe_impl=impl)
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, 512)).astype(np.int32)
    changed = ids.copy()
    changed[:, 300:] = rng.integers(0, cfg.vocab_size, (1, 212))
    f = jax.jit(lambda m, x: m(x))
    a, b = np.asarray(f(model, ids)), np.asarray(f(model, changed))
    print(f"{impl}: max |diff| before the change {np.abs(a[:, :300] - b[:, :300]).max():.3e}, "
          f"after {np.abs(a[:, 300:] - b[:, 300:]).max():.3e}")


if __name__ == "__main__":
  main()
