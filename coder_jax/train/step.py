"""The pure train step, for every stage: an Objective's loss and gradients (accumulated over
micro-batches), a skipped update when the loss or the gradient is not finite, and the metrics.

An Objective says what a stage trains: `loss_fn(model, micro_batch, norms) -> (loss, metrics)`
where `norms = objective.norms(whole_batch)` are the whole batch's divisors, so the loss and
the metrics of micro-batches add up to those of the batch; `batch_axes` names each batch key's
logical axes (per-token [B, T] keys and per-row [B] keys such as GRPO's advantages alike), which
places the batch on the mesh and splits it into micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coder_jax.model.logprobs import cross_entropy_from_hidden
from coder_jax.parallel.expert import token_dropping
from coder_jax.train.losses import BalanceLossConfig, balance_losses

TOKEN_AXES = ("batch", "activation_length")
ROW_AXES = ("batch",)
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


@dataclasses.dataclass(frozen=True)
class Objective:
  loss_fn: Callable        # (model, micro_batch, norms) -> (loss, {name: additive metric})
  batch_axes: Mapping[str, tuple]
  norms: Callable          # whole batch -> {name: divisor}
  finalize: Callable = lambda metrics, norms: metrics   # after accumulation (jittable)


def token_norms(batch) -> dict:
  """Weighted tokens and rows holding tokens: the divisors of the token-mean losses."""
  return {"tokens": jnp.maximum(batch["loss_weights"].astype(jnp.float32).sum(), 1.0),
          "rows": jnp.maximum((batch["segment_ids"] > 0).any(axis=1).astype(jnp.float32).sum(),
                              1.0)}


def moe_balance(cfg, alphas, aux, norms) -> tuple[jnp.ndarray, dict]:
  """The balance losses' sum, and {their values, per-layer routed-copy counts, per-layer dropped
  and routed copies (key `moe_drops`: {"layer_<i>": [dropped, copies]}, i the decoder layer)}."""
  bal = balance_losses(aux["router"], cfg, alphas, num_rows=norms["rows"])
  counts = (jnp.concatenate([s["count"].sum(axis=1) for s in aux["router"]], axis=0)
            if aux["router"] else jnp.zeros((0, 0), jnp.float32))
  moe_layers = [i for i, kind in enumerate(cfg.layer_kinds()) if kind == "moe"]
  per_layer = [jnp.stack([d, c * cfg.num_experts_per_tok], axis=-1)
               for s in aux["router"]
               for d, c in zip(s["dropped"].sum(axis=1), s["tokens"].sum(axis=1))]
  drops = {f"layer_{i}": v for i, v in zip(moe_layers, per_layer)}
  return sum(bal.values()), {**bal, "expert_counts": counts, "moe_drops": drops}


def expert_load(metrics: dict, norms) -> dict:
  """Replaces the accumulated per-layer copy counts by each layer's load fractions, and the
  dropped-copy counts by drop fractions: `drop_fraction` (all MoE layers) and
  `drop_fraction/layer_<i>` (dropped / routed copies of valid tokens; 0 outside training)."""
  m = dict(metrics)
  counts = m.pop("expert_counts")
  m["expert_load"] = (counts / jnp.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
                      if counts.size else counts)
  drops = m.pop("moe_drops", {})
  for name, (dropped, copies) in drops.items():
    m[f"drop_fraction/{name}"] = dropped / jnp.maximum(copies, 1.0)
  if drops:
    total = sum(drops.values())
    m["drop_fraction"] = total[0] / jnp.maximum(total[1], 1.0)
  m["tokens"] = norms["tokens"]
  return m


def check_loss_chunk_size(loss_chunk_size) -> None:
  if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int)
                                      or isinstance(loss_chunk_size, bool) or loss_chunk_size < 1):
    raise ValueError(f"loss_chunk_size: a positive number of positions or None, got "
                     f"{loss_chunk_size!r}")


def lm_objective(cfg, alphas: BalanceLossConfig = BalanceLossConfig(), *,
                 loss_chunk_size: int | None = None) -> Objective:
  """Next-token cross-entropy over weighted tokens (pretraining; SFT with loss_weights on the
  assistant tokens only) plus DeepSeek-V2's balance losses.

  The cross-entropy comes from the final hidden states in one pass that also forms its
  gradients (model/logprobs.py's cross_entropy_from_hidden: the logits are never kept for the
  backward). loss_chunk_size: form the logits that many positions at a time, so at most
  [rows, chunk, vocab] of them exist at once: at 128K tokens the whole [rows, T, 102400] is
  50 GiB per row in float32. None: the whole sequence at once."""
  check_loss_chunk_size(loss_chunk_size)

  def loss_fn(model, mb, norms):
    h, aux = model.hidden_states(mb["inputs"], mb["segment_ids"], mb["positions"])
    ce_sum = cross_entropy_from_hidden(model, h, mb["targets"], mb["loss_weights"],
                                       chunk_size=loss_chunk_size)
    ce = ce_sum / norms["tokens"]
    bal, metrics = moe_balance(cfg, alphas, aux, norms)
    return ce + bal, {"ce_loss": ce, **metrics}

  return Objective(loss_fn, {k: TOKEN_AXES for k in BATCH_KEYS}, token_norms, expert_load)


def make_step(graphdef, optimizer, schedule, objective: Objective, *, grad_accum_steps: int = 1):
  """train_step(state, batch) -> (state, metrics). Jit it with the state's shardings."""

  def loss(params, mb, norms):
    return objective.loss_fn(nnx.merge(graphdef, params), mb, norms)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    norms = objective.norms(batch)
    with token_dropping(True):
      if grad_accum_steps == 1:
        (loss_v, metrics), grads = grad_fn(params, batch, norms)
      else:
        a = grad_accum_steps
        # Row r goes to micro-batch r % a, so each micro-batch keeps the batch's sharding.
        micro = {k: jnp.swapaxes(batch[k].reshape((-1, a) + batch[k].shape[1:]), 0, 1)
                 for k in objective.batch_axes}

        def body(carry, mb):
          out = grad_fn(params, mb, norms)
          return jax.tree.map(jnp.add, carry, out), None

        shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                                norms))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((loss_v, metrics), grads), _ = jax.lax.scan(body, init, micro)
    if "nan_poison" in batch:  # fault injection for tests of the non-finite guard
      loss_v = loss_v + batch["nan_poison"]
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss_v) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"],
                 "nonfinite": state["nonfinite"] + (~ok).astype(jnp.int32)}
    out = {"loss": loss_v, **objective.finalize(metrics, norms), "grad_norm": grad_norm,
           "learning_rate": schedule(_schedule_count(state["opt_state"], state["step"])),
           "skipped": (~ok).astype(jnp.int32), "nonfinite_total": new_state["nonfinite"]}
    return new_state, out

  return train_step


def make_train_step(graphdef, cfg, optimizer, schedule, *, alphas=BalanceLossConfig(),
                    grad_accum_steps: int = 1, loss_chunk_size: int | None = None):
  """The language-model train step (pretraining)."""
  return make_step(graphdef, optimizer, schedule,
                   lm_objective(cfg, alphas, loss_chunk_size=loss_chunk_size),
                   grad_accum_steps=grad_accum_steps)


def _schedule_count(opt_state, step):
  """The step count the learning-rate schedule used: skipped updates keep the optimizer state,
  its count included, so the schedule does not advance on them."""
  found = [x.count for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
           if isinstance(x, optax.ScaleByScheduleState)]
  return found[0] if found else step


def loss_and_grads(graphdef, cfg, params, batch, alphas=BalanceLossConfig(), *,
                   loss_chunk_size: int | None = None):
  """Loss and gradients of one batch (no update); for tests comparing meshes."""
  objective = lm_objective(cfg, alphas, loss_chunk_size=loss_chunk_size)
  norms = objective.norms(batch)
  with token_dropping(True):
    (loss, _), grads = jax.value_and_grad(
        lambda p: objective.loss_fn(nnx.merge(graphdef, p), batch, norms), has_aux=True)(params)
  return loss, grads
