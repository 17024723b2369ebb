"""The pure train step: forward, losses, gradients (accumulated over micro-batches), a skipped
update when the loss or the gradient is not finite, and the step's metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coder_jax.parallel.expert import token_dropping
from coder_jax.train.losses import BalanceLossConfig, balance_losses, cross_entropy_sum

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


def _forward(graphdef, cfg, alphas, params, mb, num_tokens, num_rows):
  model = nnx.merge(graphdef, params)
  logits, aux = model(mb["inputs"], mb["segment_ids"], mb["positions"], return_aux=True)
  ce_sum = cross_entropy_sum(logits, mb["targets"], mb["loss_weights"])
  bal = balance_losses(aux["router"], cfg, alphas, num_rows=num_rows)
  loss = ce_sum / num_tokens + sum(bal.values())
  counts = (jnp.concatenate([s["count"].sum(axis=1) for s in aux["router"]], axis=0)
            if aux["router"] else jnp.zeros((0, 0), jnp.float32))
  return loss, (ce_sum, bal, counts)


def _batch_norms(batch):
  num_tokens = jnp.maximum(batch["loss_weights"].astype(jnp.float32).sum(), 1.0)
  num_rows = jnp.maximum((batch["segment_ids"] > 0).any(axis=1).astype(jnp.float32).sum(), 1.0)
  return num_tokens, num_rows


def make_train_step(graphdef, cfg, optimizer, schedule, *, alphas=BalanceLossConfig(),
                    grad_accum_steps: int = 1):
  """train_step(state, batch) -> (state, metrics). Jit it with the state's shardings."""
  grad_fn = jax.value_and_grad(lambda p, mb, nt, nr: _forward(graphdef, cfg, alphas, p, mb, nt, nr),
                               has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    num_tokens, num_rows = _batch_norms(batch)
    with token_dropping(True):
      if grad_accum_steps == 1:
        (loss, (ce_sum, bal, counts)), grads = grad_fn(params, batch, num_tokens, num_rows)
      else:
        a = grad_accum_steps
        # Row r goes to micro-batch r % a, so each micro-batch keeps the batch's sharding.
        micro = {k: jnp.swapaxes(batch[k].reshape((-1, a) + batch[k].shape[1:]), 0, 1)
                 for k in BATCH_KEYS}

        def body(carry, mb):
          (loss, (ce_sum, bal, counts)), g = grad_fn(params, mb, num_tokens, num_rows)
          acc = jax.tree.map(jnp.add, carry, (g, loss, ce_sum, bal, counts))
          return acc, None

        zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                               num_tokens, num_rows))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            (zeros[1], zeros[0][0], *zeros[0][1]))
        (grads, loss, ce_sum, bal, counts), _ = jax.lax.scan(body, init, micro)
    if "nan_poison" in batch:  # fault injection for tests of the non-finite guard
      loss = loss + batch["nan_poison"]
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"],
                 "nonfinite": state["nonfinite"] + (~ok).astype(jnp.int32)}
    load = counts / jnp.maximum(counts.sum(axis=-1, keepdims=True), 1.0) if counts.size else counts
    metrics = {"loss": loss, "ce_loss": ce_sum / num_tokens, **bal, "grad_norm": grad_norm,
               "learning_rate": schedule(_schedule_count(state["opt_state"], state["step"])),
               "tokens": num_tokens,
               "skipped": (~ok).astype(jnp.int32), "expert_load": load}
    return new_state, metrics

  return train_step


def _schedule_count(opt_state, step):
  """The step count the learning-rate schedule used: skipped updates keep the optimizer state,
  its count included, so the schedule does not advance on them."""
  found = [x.count for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
           if isinstance(x, optax.ScaleByScheduleState)]
  return found[0] if found else step


def loss_and_grads(graphdef, cfg, params, batch, alphas=BalanceLossConfig()):
  """Loss and gradients of one batch (no update); for tests comparing meshes."""
  num_tokens, num_rows = _batch_norms(batch)
  with token_dropping(True):
    (loss, _), grads = jax.value_and_grad(
        lambda p: _forward(graphdef, cfg, alphas, p, batch, num_tokens, num_rows),
        has_aux=True)(params)
  return loss, grads
