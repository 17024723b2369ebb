"""Model demo (gin_configs/runs/demo.gin; training is gin_configs/runs/pretrain.gin and the
stages beside it): build or load a model, count its parameters, run a forward pass and check
that packed rows equal their documents run alone."""

from __future__ import annotations

import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

from coder_jax.model.config import get_config
from coder_jax.model.decoder import init_model
from coder_jax.model.info import report


def _cross_entropy(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


@gin.configurable
def model_demo(batch_size: int = 2, seq_len: int = 64, seed: int = 0, hf_dir: str | None = None):
  if hf_dir:
    from coder_jax import hf
    model = hf.load(hf_dir)
  else:
    model = init_model(get_config(), seed=seed)
  cfg = model.cfg
  print(report(cfg, hf_dir or "model_config (gin)"))
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, seq_len)), jnp.int32)
  forward = jax.jit(lambda m, x, s=None: m(x, s))
  logits = jax.block_until_ready(forward(model, ids))
  t0 = time.perf_counter()
  logits = jax.block_until_ready(forward(model, ids))
  dt = time.perf_counter() - t0
  loss = float(_cross_entropy(logits, ids))
  print(f"forward              logits {tuple(logits.shape)} {logits.dtype}, "
        f"{batch_size * seq_len / dt:,.0f} tokens/s (jit, cpu)")
  print(f"loss on random ids   {loss:.4f} (ln vocab = {np.log(cfg.vocab_size):.4f})")
  # Two documents packed into one row must give the logits each gives alone.
  half = seq_len // 2
  seg = jnp.concatenate([jnp.ones((1, half), jnp.int32), jnp.full((1, seq_len - half), 2, jnp.int32)], 1)
  packed = forward(model, ids[:1], seg)
  alone = jnp.concatenate([forward(model, ids[:1, :half]), forward(model, ids[:1, half:])], axis=1)
  diff = float(jnp.max(jnp.abs(packed - alone)))
  print(f"packed vs alone      max |diff| = {diff:.2e}")
  return {"loss": loss, "packed_diff": diff, "logits_shape": tuple(logits.shape)}
