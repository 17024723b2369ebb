"""Training losses: token cross-entropy and DeepSeek-V2's three balance losses (section 2.2.3).

For a sequence of T tokens, N_r routed experts, K chosen per token, D device groups E_1..E_D and
a device limit M:
  f_i   = N_r / (K T) * sum_t 1(token t chooses expert i)         P_i = 1/T * sum_t s_{i,t}
  expert-level        L1 = a1 * sum_i f_i P_i
  device-level        L2 = a2 * sum_d f'_d P'_d,   f'_d = mean_{i in E_d} f_i,  P'_d = sum_{i in E_d} P_i
  communication       L3 = a3 * sum_d f''_d P'_d,  f''_d = D / (M T) * sum_t 1(t sends to device d)
Each is computed per sequence (a packed row; padding excluded), averaged over the rows of the
batch that hold tokens, and summed over MoE layers. Without a device limit M = min(K, D).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp


@gin.configurable("balance_loss")
@dataclasses.dataclass(frozen=True)
class BalanceLossConfig:
  expert_alpha: float = 0.001   # a1 (Lite: 0.001 only; 236B: 0.003)
  device_alpha: float = 0.0     # a2 (236B: 0.05)
  comm_alpha: float = 0.0       # a3 (236B: 0.02)


def cross_entropy_sum(logits_BTV, targets_BT, weights_BT):
  """Sum over weighted tokens of -log p(target), float32."""
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - tgt) * weights_BT.astype(jnp.float32))


def balance_terms(stats: dict, cfg) -> dict[str, jnp.ndarray]:
  """Per-row unweighted sums over layers: {'expert','device','comm'} each [B].

  stats: one MoE run's router stats with a leading layers axis ([L, B, E] / [L, B, D] / [L, B])."""
  e, k, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.routing_devices
  m = cfg.routing_device_limit or min(k, d)
  t = jnp.maximum(stats["tokens"], 1.0)[..., None]               # [L, B, 1]
  f = stats["count"] * (e / k) / t                               # [L, B, E]
  p = stats["score_sum"] / t
  expert = jnp.sum(f * p, axis=-1)
  lead = f.shape[:-1]
  f_dev = f.reshape(lead + (d, e // d)).mean(axis=-1)            # [L, B, D]
  p_dev = p.reshape(lead + (d, e // d)).sum(axis=-1)
  device = jnp.sum(f_dev * p_dev, axis=-1)
  f_comm = stats["device_count"] * (d / m) / t
  comm = jnp.sum(f_comm * p_dev, axis=-1)
  return {"expert": expert.sum(0), "device": device.sum(0), "comm": comm.sum(0)}


def balance_losses(router_aux: list, cfg, alphas: BalanceLossConfig, num_rows=None):
  """{'expert_balance', 'device_balance', 'comm_balance'}: alpha * mean over rows with tokens.

  num_rows: the divisor (rows holding tokens) when this is one micro-batch of a larger batch."""
  names = {"expert": ("expert_balance", alphas.expert_alpha),
           "device": ("device_balance", alphas.device_alpha),
           "comm": ("comm_balance", alphas.comm_alpha)}
  out = {v[0]: jnp.zeros((), jnp.float32) for v in names.values()}
  if not router_aux:
    return out
  has_tokens = (router_aux[0]["tokens"][0] > 0).astype(jnp.float32)
  denom = jnp.maximum(has_tokens.sum(), 1.0) if num_rows is None else num_rows
  for stats in router_aux:
    for key, row in balance_terms(stats, cfg).items():
      name, alpha = names[key]
      out[name] = out[name] + alpha * jnp.sum(row * has_tokens) / denom
  return out

