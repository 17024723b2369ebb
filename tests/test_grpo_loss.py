"""GRPO's loss and advantages against a float64 numpy oracle written token by token from
DeepSeekMath's formula, with gradients by float64 central differences of that oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coder_jax.train.grpo import grpo_loss, group_advantages

B, T = 5, 9
# Ragged responses: prompts of different lengths before them, padding after, one empty row.
SPANS = [(2, 9), (0, 4), (3, 3), (1, 8), (5, 6)]


def _oracle(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation):
  """-J in float64, one token at a time; returns (loss, kl mean, clip fraction, ratio mean)."""
  row_sums, row_counts = [], []
  kls, clips, ratios = [], [], []
  for b in range(logp.shape[0]):
    s, n = 0.0, 0
    for t in range(logp.shape[1]):
      if not mask[b, t]:
        continue
      rho = np.exp(logp[b, t] - old[b, t])
      a = adv[b]
      term = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
      kl = 0.0
      if ref is not None:
        x = np.exp(ref[b, t] - logp[b, t])           # pi_ref / pi
        kl = x - np.log(x) - 1
      s += term - beta * kl
      n += 1
      kls.append(kl)
      ratios.append(rho)
      clips.append((a > 0 and rho > 1 + eps_high) or (a < 0 and rho < 1 - eps_low))
    row_sums.append(s)
    row_counts.append(n)
  if aggregation == "token_mean":
    j = sum(row_sums) / sum(row_counts)
  else:
    per_row = [s / n for s, n in zip(row_sums, row_counts) if n]
    j = sum(per_row) / len(per_row)
  return -j, np.mean(kls), np.mean(clips), np.mean(ratios)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, T), bool)
  for b, (s, e) in enumerate(SPANS):
    mask[b, s:e] = True
  old = -rng.uniform(0.1, 4.0, (B, T))
  # Ratios spread well past both clip bounds, so every branch of the min is exercised.
  logp = old + rng.normal(0, 0.35, (B, T))
  ref = logp + rng.normal(0, 0.4, (B, T))
  adv = rng.normal(0, 1, B)
  return logp, old, ref, adv, mask


def _fd_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, dn = x.copy(), x.copy()
    up[idx] += h
    dn[idx] -= h
    g[idx] = (f(up) - f(dn)) / (2 * h)
  return g


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_gradient_and_metrics_equal_float64_oracle(aggregation, eps_low, eps_high, beta):
  logp, old, ref, adv, mask = _inputs()
  ref_or_none = ref if beta else None
  kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation=aggregation)
  want, kl, clip, ratio = _oracle(logp, old, ref_or_none, adv, mask, eps_low, eps_high, beta,
                                  aggregation)
  want_grad = _fd_grad(lambda x: _oracle(x, old, ref_or_none, adv, mask, eps_low, eps_high,
                                         beta, aggregation)[0], logp)
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)

  def loss_fn(x):
    return grpo_loss(x, f32(old), f32(ref_or_none), f32(adv), jnp.asarray(mask), **kw)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(logp))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[~mask] == 0)
  assert 0 < clip < 1          # the inputs really do clip, in both directions
  np.testing.assert_allclose(float(metrics["clip_fraction"]), clip, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["ratio"]), ratio, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(metrics["policy_loss"] + metrics["kl_loss"]), float(loss),
                             rtol=1e-6)


def test_clipped_tokens_carry_no_gradient_and_only_old_policy_is_constant():
  """Hand cases: a ratio past 1+eps with A > 0 and one under 1-eps with A < 0 are clipped (zero
  gradient); the same ratios with the other sign of A are not (gradient rho * A / n)."""
  r = np.log([1.5, 0.5, 1.5, 0.5])
  logp = jnp.asarray(r[None].repeat(2, 0), jnp.float32)
  zeros = jnp.zeros_like(logp)
  adv = jnp.asarray([1.0, -1.0])
  mask = jnp.asarray([[1, 0, 0, 0], [0, 1, 1, 0]])   # row 0: rho 1.5; row 1: rho 0.5 and 1.5
  g = jax.grad(lambda x: grpo_loss(x, zeros, None, adv, mask, beta=0.0)[0])(logp)
  np.testing.assert_allclose(np.asarray(g), [[0, 0, 0, 0], [0, 0, 1.5 / 3, 0]], atol=1e-7)
  _, m = grpo_loss(logp, zeros, None, adv, mask, beta=0.0)
  np.testing.assert_allclose(float(m["clip_fraction"]), 2 / 3, rtol=1e-6)
  # old, ref and advantages are constants of the objective.
  grads = jax.grad(lambda o, rf, a: grpo_loss(logp, o, rf, a, mask)[0], argnums=(0, 1, 2))(
      zeros, zeros - 0.3, adv)
  assert all(np.all(np.asarray(x) == 0) for x in grads)


def test_k3_kl_is_zero_when_policy_equals_reference():
  logp, old, _, adv, mask = _inputs(1)
  x = jnp.asarray(logp, jnp.float32)
  args = (jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(mask))
  loss, m = grpo_loss(x, args[0], x, *args[1:], beta=0.04)
  assert float(m["kl"]) == 0 and float(m["kl_loss"]) == 0
  assert float(loss) == float(grpo_loss(x, args[0], None, *args[1:], beta=0.0)[0])
  # ... and positive otherwise (k3 >= 0 token by token).
  _, m = grpo_loss(x, args[0], x + 0.5, *args[1:], beta=0.04)
  assert float(m["kl"]) > 0


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batch_losses_add_up_to_the_batch_loss(aggregation):
  logp, old, ref, adv, mask = _inputs(2)
  a = [jnp.asarray(v, jnp.float32) for v in (logp, old, ref, adv)] + [jnp.asarray(mask)]
  kw = dict(eps_high=0.28, aggregation=aggregation)
  whole, wm = grpo_loss(*a, **kw)
  whole_grad = jax.grad(lambda x: grpo_loss(x, *a[1:], **kw)[0])(a[0])
  norm = dict(num_tokens=int(mask.sum()), num_rows=int((mask.sum(1) > 0).sum()))
  total, grads, metrics = 0.0, [], {k: 0.0 for k in ("kl", "ratio", "clip_fraction")}
  for rows in (slice(0, 2), slice(2, 5)):   # rows 2 (empty) and 3, 4 in the second
    part = [v[rows] for v in a]
    loss, m = grpo_loss(*part, **kw, **norm)
    total += float(loss)
    grads.append(jax.grad(lambda x: grpo_loss(x, *part[1:], **kw, **norm)[0])(part[0]))
    metrics = {k: metrics[k] + float(m[k]) for k in metrics}
  np.testing.assert_allclose(total, float(whole), rtol=1e-5)
  np.testing.assert_allclose(np.concatenate(grads), np.asarray(whole_grad), rtol=1e-5, atol=1e-8)
  for k, v in metrics.items():
    np.testing.assert_allclose(v, float(wm[k]), rtol=1e-5)


def test_values_under_the_mask_are_ignored():
  """Padding may hold -inf or nan (e.g. gathered at a pad id): the loss and gradient stay those
  of the clean inputs."""
  logp, old, ref, adv, mask = _inputs(3)
  clean = [jnp.asarray(v, jnp.float32) for v in (logp, old, ref, adv)] + [jnp.asarray(mask)]
  dirty = [np.where(mask, v, bad) for v, bad in ((logp, -np.inf), (old, np.nan), (ref, np.inf))]
  dirty = [jnp.asarray(v, jnp.float32) for v in dirty] + clean[3:]
  for agg in ("token_mean", "sequence_mean"):
    f = lambda x, rest: grpo_loss(x, *rest, aggregation=agg)[0]
    l0, g0 = jax.value_and_grad(f)(clean[0], clean[1:])
    l1, g1 = jax.value_and_grad(f)(dirty[0], dirty[1:])
    assert float(l0) == float(l1)
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))


def test_group_advantages_equal_numpy_and_flat_groups_are_zero():
  rng = np.random.default_rng(4)
  r = rng.normal(size=12)
  r[4:8] = 0.1                               # one group of equal rewards (mean != 0.1 in f32)
  got = np.asarray(group_advantages(jnp.asarray(r), 4))
  g = r.reshape(3, 4)
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-4)).reshape(-1)
  np.testing.assert_allclose(got[[0, 1, 2, 3, 8, 9, 10, 11]], want[[0, 1, 2, 3, 8, 9, 10, 11]],
                             rtol=1e-5)
  assert np.all(got[4:8] == 0)
  binary = np.asarray(group_advantages(jnp.asarray([1, 0, 0, 0, 1, 1, 1, 1.0]), 4, eps=0.0))
  np.testing.assert_allclose(binary, [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3),
                                      -1 / np.sqrt(3), 0, 0, 0, 0], rtol=1e-6)
  sample_std = np.asarray(group_advantages(jnp.asarray(r[:4]), 4, ddof=1))
  np.testing.assert_allclose(sample_std, (r[:4] - r[:4].mean()) / (r[:4].std(ddof=1) + 1e-4),
                             rtol=1e-5)


def test_unscaled_advantages_are_reward_minus_group_mean():
  # Dr. GRPO's A = r - mean: float64 numpy is the oracle; a flat group is still exactly 0, and a
  # group that differs by 0.01 gets advantages 100x smaller than one that differs by 1 (with
  # "group" scaling both would be +-1).
  rng = np.random.default_rng(5)
  r = rng.normal(size=12)
  r[4:8] = 0.1
  got = np.asarray(group_advantages(jnp.asarray(r), 4, scale="none"))
  g = r.reshape(3, 4)
  want = (g - g.mean(1, keepdims=True)).reshape(-1)
  np.testing.assert_allclose(got[[0, 1, 2, 3, 8, 9, 10, 11]], want[[0, 1, 2, 3, 8, 9, 10, 11]],
                             rtol=1e-5)
  assert np.all(got[4:8] == 0)
  r = jnp.asarray([0.01, 0, 0.01, 0, 1, 0, 1, 0])
  np.testing.assert_allclose(np.asarray(group_advantages(r, 4, scale="none")),
                             [0.005, -0.005, 0.005, -0.005, 0.5, -0.5, 0.5, -0.5], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(group_advantages(r, 4, eps=0.0)),
                             [1, -1, 1, -1, 1, -1, 1, -1], rtol=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(aggregation="mean"), "aggregation must be one of"),
    (dict(eps_low=1.0), r"eps_low must be in \[0, 1\)"),
    (dict(eps_low=-0.1), r"eps_low must be in \[0, 1\)"),
    (dict(eps_high=-0.2), "eps_high must be >= 0"),
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(ref=None), "ref_logp_BT is None but beta is 0.04"),
    (dict(adv=jnp.zeros((3,))), r"advantages_B must be \[batch\]"),
    (dict(mask=jnp.ones((2, 3))), "mask_BT must have the shape of logp_BT"),
])
def test_bad_arguments_raise_clear_errors(kw, msg):
  x = jnp.zeros((2, 4))
  ref, adv, mask = kw.pop("ref", x), kw.pop("adv", jnp.zeros((2,))), kw.pop("mask", x)
  with pytest.raises(ValueError, match=msg):
    grpo_loss(x, x, ref, adv, mask, **kw)


@pytest.mark.parametrize("args, msg", [
    ((np.zeros(6), 4), "not a whole number of groups"),
    ((np.zeros(6), 1), "group_size must be an int >= 2"),
    ((np.zeros((2, 4)), 2), r"one reward per row"),
    ((np.zeros(4), 2, 1e-4, 0, "batch"), r"scale must be one of \('group', 'none'\); got 'batch'"),
])
def test_bad_groups_raise_clear_errors(args, msg):
  with pytest.raises(ValueError, match=msg):
    group_advantages(*args)
