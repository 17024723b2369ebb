"""GRPO's objective (DeepSeekMath, arXiv 2402.03300, eq. 3) and its group-relative advantages.

For G sampled responses o_i per prompt, with per-token ratio rho_t = pi(o_t) / pi_old(o_t):
  J = 1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)
                                 - beta KL_t ]
  KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1     (k3 estimator: unbiased, >= 0)
and the loss is -J. "sequence_mean" is that formula (a mean over responses of per-response token
means); "token_mean" (DAPO, arXiv 2503.14476) divides the sum over every response token of the
batch by their number, so long responses weigh by their length. eps_high > eps_low is DAPO's
clip-higher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "sequence_mean")


def _check(eps_low, eps_high, beta, aggregation, ref_logp_BT):
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
  # 1 - eps_low <= 0 would let the lower clip never bind (ratios are positive).
  if not 0 <= eps_low < 1:
    raise ValueError(f"eps_low must be in [0, 1); got {eps_low}")
  if not eps_high >= 0:
    raise ValueError(f"eps_high must be >= 0; got {eps_high}")
  if not beta >= 0:
    raise ValueError(f"beta must be >= 0; got {beta}")
  if ref_logp_BT is None and beta > 0:
    raise ValueError(f"ref_logp_BT is None but beta is {beta}: the KL term needs the reference "
                     "log-probabilities (pass them, or set beta = 0 to drop the reference)")


def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, advantages_B, mask_BT, *, eps_low=0.2,
              eps_high=0.2, beta=0.04, aggregation="token_mean", num_tokens=None, num_rows=None):
  """(loss = -J, metrics) for one batch of responses; gradients flow only through logp_BT.

  logp_BT / old_logp_BT / ref_logp_BT: log-probabilities of the response tokens under the policy
  being trained, the policy that sampled them, and the frozen reference (None allowed when
  beta == 0). advantages_B: one per response (see group_advantages). mask_BT: 1 on response
  tokens, 0 on prompt and padding (values there are ignored, even inf or nan).

  num_tokens / num_rows: divisors for one micro-batch of a larger batch: the whole batch's
  masked-token count ("token_mean") or count of rows holding tokens ("sequence_mean"); then the
  micro-batches' losses add up to the whole batch's loss. Without them the batch's own counts.

  metrics (float32 scalars): policy_loss (the clipped surrogate's part of the loss), kl_loss
  (beta times the aggregated KL: loss = policy_loss + kl_loss), and token means of kl (k3; 0 when
  there is no reference), ratio, clip_fraction (share of tokens where the clipped term is the
  minimum, so they carry no gradient: rho > 1 + eps_high with A > 0, rho < 1 - eps_low with
  A < 0). Token means divide by num_tokens when given, so they too add up over micro-batches.
  """
  _check(eps_low, eps_high, beta, aggregation, ref_logp_BT)
  shape = jnp.shape(logp_BT)
  if len(shape) != 2:
    raise ValueError(f"logp_BT must be [batch, time]; got shape {shape}")
  others = [("old_logp_BT", old_logp_BT), ("mask_BT", mask_BT)]
  if ref_logp_BT is not None:
    others.append(("ref_logp_BT", ref_logp_BT))
  for name, a in others:
    if jnp.shape(a) != shape:
      raise ValueError(f"{name} must have the shape of logp_BT {shape}; got {jnp.shape(a)}")
  if jnp.shape(advantages_B) != shape[:1]:
    raise ValueError(f"advantages_B must be [batch] = {shape[:1]}; got {jnp.shape(advantages_B)}")

  f32 = jnp.float32
  mask = jnp.asarray(mask_BT).astype(bool)
  m = mask.astype(f32)
  logp = jnp.asarray(logp_BT).astype(f32)
  old = jax.lax.stop_gradient(jnp.asarray(old_logp_BT).astype(f32))
  adv = jax.lax.stop_gradient(jnp.asarray(advantages_B).astype(f32))[:, None]
  # Differences are zeroed off the mask before exp, so padding holding -inf or nan can neither
  # overflow nor send nan through the gradient (where's cotangent there is exactly 0).
  log_ratio = jnp.where(mask, logp - old, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  surrogate = jnp.minimum(unclipped, clipped)
  clip_hit = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))

  if ref_logp_BT is None:
    kl = jnp.zeros_like(logp)
  else:
    ref = jax.lax.stop_gradient(jnp.asarray(ref_logp_BT).astype(f32))
    d = jnp.where(mask, ref - logp, 0.0)
    kl = jnp.exp(d) - d - 1.0

  row_tokens = m.sum(axis=1)
  if aggregation == "token_mean":
    denom = jnp.maximum(m.sum(), 1.0) if num_tokens is None else jnp.asarray(num_tokens, f32)

    def agg(x_BT):
      return jnp.sum(x_BT * m) / denom
  else:
    rows = (jnp.maximum((row_tokens > 0).sum(), 1) if num_rows is None else num_rows)
    per_row = 1.0 / jnp.maximum(row_tokens, 1.0)   # empty rows add 0 to the numerator

    def agg(x_BT):
      return jnp.sum(jnp.sum(x_BT * m, axis=1) * per_row) / jnp.asarray(rows, f32)

  policy_loss = -agg(surrogate)
  kl_loss = beta * agg(kl) if ref_logp_BT is not None else jnp.zeros((), f32)
  loss = policy_loss + kl_loss

  tokens = jnp.maximum(m.sum(), 1.0) if num_tokens is None else jnp.asarray(num_tokens, f32)

  def token_mean(x_BT):
    return jax.lax.stop_gradient(jnp.sum(jnp.where(mask, x_BT, 0.0)) / tokens)

  metrics = dict(policy_loss=jax.lax.stop_gradient(policy_loss),
                 kl_loss=jax.lax.stop_gradient(kl_loss), kl=token_mean(kl),
                 ratio=token_mean(ratio), clip_fraction=token_mean(clip_hit.astype(f32)))
  return loss, metrics


ADVANTAGE_SCALES = ("group", "none")


def group_advantages(rewards_B, group_size: int, eps: float = 1e-4, ddof: int = 0,
                     scale: str = "group"):
  """A = (r - mean) / (std + eps) within consecutive groups of `group_size` rows (one prompt's
  samples); float32 [B]. A group whose rewards are all equal gets exactly 0.

  ddof 0 is the population std (DeepSeekMath's std over the group); ddof 1 is torch's default
  `Tensor.std`, which TRL's GRPOTrainer uses. scale "none" leaves out the division (Dr. GRPO,
  Liu et al. 2025: A = r - mean): a group whose rewards differ only a little (a reward model's
  noise while no sample earns a 0/1 reward yet) then gets a small advantage, where "group"
  scales it up to the size of a group that differs by a whole 0/1 reward."""
  if not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"group_size must be an int >= 2 (GRPO compares samples of one prompt); "
                     f"got {group_size!r}")
  if ddof not in (0, 1):
    raise ValueError(f"ddof must be 0 or 1; got {ddof!r}")
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}; got {scale!r}")
  r = jnp.asarray(rewards_B, jnp.float32)
  if r.ndim != 1:
    raise ValueError(f"rewards_B must be one reward per row, [batch]; got shape {r.shape}")
  if r.shape[0] % group_size:
    raise ValueError(f"the batch ({r.shape[0]} rows) is not a whole number of groups of "
                     f"group_size {group_size}")
  r_NG = r.reshape(-1, group_size)
  mean = r_NG.mean(axis=1, keepdims=True)
  centred = r_NG - mean
  if scale == "group":
    centred = centred / (r_NG.std(axis=1, keepdims=True, ddof=ddof) + eps)
  # The mean of equal float32 values can differ from them in the last bit, which eps alone
  # would turn into a nonzero advantage; a constant group carries no signal, so force 0.
  flat = (r_NG.max(axis=1, keepdims=True) == r_NG.min(axis=1, keepdims=True))
  return jnp.where(flat, 0.0, centred).reshape(-1)
