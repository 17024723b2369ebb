"""DeepSeek-V2's expert / device / communication balance losses (coder_jax/train/losses.py)
against a float64 numpy transcription of the paper's formulas (section 2.2.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from random_params import random_model_state
from coder_jax.model import get_config, route, segment_positions
from coder_jax.model.decoder import router_stats
from coder_jax.model.moe import RouterOutput
from coder_jax.model.rope import rope_tables
from coder_jax.train.losses import BalanceLossConfig, balance_losses, balance_terms

ALPHAS = BalanceLossConfig(expert_alpha=0.003, device_alpha=0.05, comm_alpha=0.02)
NAMES = ("expert_balance", "device_balance", "comm_balance")


def _rel(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _np_row_terms(scores_BTE, experts_BTK, valid_BT, *, e, k, d, m):
  """float64 [3, B]: sum_i f_i P_i, sum_d f'_d P'_d, sum_d f''_d P'_d for each row (0 for a row
  without tokens), written from the formulas:
    f_i = N_r/(K T) #{t: t chooses i},  P_i = 1/T sum_t s_{i,t},
    f'_d = mean_{i in E_d} f_i,  P'_d = sum_{i in E_d} P_i,  f''_d = D/(M T) #{t: t sends to d}."""
  b_rows = scores_BTE.shape[0]
  per = e // d
  out = np.zeros((3, b_rows))
  for b in range(b_rows):
    toks = np.flatnonzero(valid_BT[b])
    t_n = len(toks)
    if t_n == 0:
      continue
    hits = np.zeros(e)
    p = np.zeros(e)
    sends = np.zeros(d)
    for t in toks:
      for i in experts_BTK[b, t]:
        hits[i] += 1
      p += np.asarray(scores_BTE[b, t], np.float64)
      for dev in set(int(i) // per for i in experts_BTK[b, t]):
        sends[dev] += 1
    f = hits * e / (k * t_n)
    p = p / t_n
    f_dev = np.array([f[g * per:(g + 1) * per].mean() for g in range(d)])
    p_dev = np.array([p[g * per:(g + 1) * per].sum() for g in range(d)])
    f_comm = sends * d / (m * t_n)
    out[:, b] = [np.dot(f, p), np.dot(f_dev, p_dev), np.dot(f_comm, p_dev)]
  return out


def _np_losses(layers, valid_BT, alphas, *, e, k, d, m, num_rows=None):
  """layers: [(scores_BTE, experts_BTK)] of every MoE layer. alpha * (mean over rows holding
  tokens), summed over layers."""
  has = valid_BT.any(axis=1)
  denom = has.sum() if num_rows is None else num_rows
  total = np.zeros(3)
  for scores, experts in layers:
    terms = _np_row_terms(scores, experts, valid_BT, e=e, k=k, d=d, m=m)
    total += terms[:, has].sum(axis=1) / denom
  return dict(zip(NAMES, total * np.array([alphas.expert_alpha, alphas.device_alpha,
                                           alphas.comm_alpha])))


def _segments(rng, b, t):
  """Packed rows with padding: a full row, trailing padding, an all-padding row, padding in the
  middle of two documents, and random rows after that."""
  seg = np.ones((b, t), np.int32)
  seg[1, t - 5:] = 0
  seg[2, :] = 0
  seg[3, : t // 2] = 1
  seg[3, t // 2: t // 2 + 3] = 0
  seg[3, t // 2 + 3:] = 2
  for row in range(4, b):
    cut = int(rng.integers(1, t))
    seg[row, :cut] = 1
    seg[row, cut:] = rng.integers(0, 2)
  return seg


def _random_layers(cfg, seed, num_layers, b, t):
  """Independent routings of random tokens (one per layer), the numpy view of each, and the
  router stats stacked on a leading layers axis (as one MoE run of the model reports them)."""
  rng = np.random.default_rng(seed)
  seg = _segments(rng, b, t)
  routed, stats = [], []
  for _ in range(num_layers):
    logits = rng.normal(size=(b * t, cfg.n_routed_experts)) * 1.5
    logits[:, 0] += 1.0                                  # some imbalance
    r = route(jnp.asarray(logits, jnp.float32), cfg)
    routed.append((np.asarray(r.scores_NE).reshape(b, t, -1),
                   np.asarray(r.experts_NK).reshape(b, t, -1)))
    stats.append(router_stats(r, jnp.asarray(seg), cfg.routing_devices))
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
  return routed, stacked, seg


CASES = [  # (n_routed_experts, k, routing_devices, routing_device_limit)
    (8, 2, 1, None), (16, 4, 4, 2), (16, 4, 4, None), (16, 3, 8, 2)]


@pytest.mark.parametrize("e,k,d,m", CASES)
def test_balance_terms_per_row_match_numpy(e, k, d, m):
  cfg = get_config("tiny", n_routed_experts=e, num_experts_per_tok=k, routing_devices=d,
                   routing_device_limit=m)
  m_eff = m or min(k, d)
  routed, stats, seg = _random_layers(cfg, 1 + e + d, 3, 6, 16)
  got = balance_terms(stats, cfg)
  ref = sum(_np_row_terms(s, x, seg > 0, e=e, k=k, d=d, m=m_eff) for s, x in routed)
  for i, key in enumerate(("expert", "device", "comm")):
    assert got[key].shape == (6,)
    assert _rel(got[key], ref[i]) <= 1e-5, (key, np.asarray(got[key]), ref[i])
  assert float(got["expert"][2]) == 0.0                  # the all-padding row


@pytest.mark.parametrize("e,k,d,m", CASES)
def test_balance_losses_multi_run_match_numpy(e, k, d, m):
  cfg = get_config("tiny", n_routed_experts=e, num_experts_per_tok=k, routing_devices=d,
                   routing_device_limit=m)
  m_eff = m or min(k, d)
  b, t = 6, 16
  rng = np.random.default_rng(100 + e + d)
  seg = _segments(rng, b, t)
  # Two MoE runs (3 and 2 layers) over the same rows, as a model with a dense layer between.
  runs, layers = [], []
  for num_layers in (3, 2):
    stats = []
    for _ in range(num_layers):
      r = route(jnp.asarray(rng.normal(size=(b * t, e)) * 2.0, jnp.float32), cfg)
      layers.append((np.asarray(r.scores_NE).reshape(b, t, e),
                     np.asarray(r.experts_NK).reshape(b, t, k)))
      stats.append(router_stats(r, jnp.asarray(seg), d))
    runs.append(jax.tree.map(lambda *a: jnp.stack(a), *stats))
  got = balance_losses(runs, cfg, ALPHAS)
  ref = _np_losses(layers, seg > 0, ALPHAS, e=e, k=k, d=d, m=m_eff)
  for name in NAMES:
    assert _rel(got[name], ref[name]) <= 1e-5, (name, float(got[name]), ref[name])
  # A micro-batch of a larger batch divides by the rows of the whole batch.
  got_mb = balance_losses(runs, cfg, ALPHAS, num_rows=11)
  ref_mb = _np_losses(layers, seg > 0, ALPHAS, e=e, k=k, d=d, m=m_eff, num_rows=11)
  for name in NAMES:
    assert _rel(got_mb[name], ref_mb[name]) <= 1e-5, name
  # Zero alphas, and no MoE layer, give zeros.
  zero = balance_losses(runs, cfg, BalanceLossConfig(0.0, 0.0, 0.0))
  assert all(float(v) == 0.0 for v in zero.values())
  assert all(float(v) == 0.0 for v in balance_losses([], cfg, ALPHAS).values())


def test_device_limit_bounds_the_comm_frequency():
  """With device-limited routing every token sends to at most M devices, so sum_d f''_d <= D."""
  cfg = get_config("tiny", n_routed_experts=16, num_experts_per_tok=4, routing_devices=4,
                   routing_device_limit=2)
  _, stats, seg = _random_layers(cfg, 7, 1, 6, 16)
  tokens = np.asarray(stats["tokens"][0])
  sends = np.asarray(stats["device_count"][0]).sum(axis=1)
  np.testing.assert_array_equal(tokens, (seg > 0).sum(axis=1))
  assert np.all(sends <= 2 * tokens)
  assert np.all(sends[tokens > 0] > tokens[tokens > 0])      # more than one device per token



def _layer_slice(stack, i):
  graphdef, state = nnx.split(stack.layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_model_router_aux_losses_match_numpy():
  """A 4-layer model (1 dense + 3 MoE layers, one scanned run): the losses from the model's
  router stats equal numpy on the routing recomputed layer by layer from the MoE inputs."""
  cfg = get_config("tiny", num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16,
                   num_experts_per_tok=4, routing_devices=4, routing_device_limit=2)
  assert cfg.layer_kinds() == ("dense", "moe", "moe", "moe")
  graphdef, state = random_model_state(cfg, 5)
  rng = np.random.default_rng(6)
  b, t = 6, 12
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  seg = _segments(rng, b, t)
  _, aux = jax.jit(lambda s, i, sg: nnx.merge(graphdef, s)(i, sg, return_aux=True))(
      state, ids, jnp.asarray(seg))
  assert len(aux["router"]) == 1 and aux["router"][0]["count"].shape == (3, b, 16)

  # Walk the layers (jitted); before each MoE layer, route its input with the layer's gate.
  def walk(st, ids_BT, seg_BT):
    m = nnx.merge(graphdef, st)
    cos, sin = rope_tables(cfg, segment_positions(seg_BT))
    x = jnp.take(m.embed_tokens[...], ids_BT, axis=0)
    routed = []
    for stack in m.stacks:
      for i in range(stack.n):
        layer = _layer_slice(stack, i)
        if layer.kind == "moe":
          h = x + layer.self_attn(layer.input_layernorm(x), cos, sin, seg_BT)
          h = layer.post_attention_layernorm(h).reshape(b * t, -1)
          r = route(h.astype(jnp.float32) @ layer.mlp.gate[...], cfg)
          routed.append((r.scores_NE.reshape(b, t, -1), r.experts_NK.reshape(b, t, -1)))
        x, _ = layer(x, cos, sin, seg_BT)
    return routed

  layers = [(np.asarray(sc), np.asarray(ex))
            for sc, ex in jax.jit(walk)(state, ids, jnp.asarray(seg))]
  assert len(layers) == 3
  counts = np.asarray(aux["router"][0]["count"])
  for li, (_, experts) in enumerate(layers):       # same routing as inside the model
    ref_count = np.zeros((b, 16))
    for row in range(b):
      for tok in np.flatnonzero(seg[row] > 0):
        ref_count[row, experts[row, tok]] += 1
    np.testing.assert_array_equal(counts[li], ref_count)

  got = balance_losses(aux["router"], cfg, ALPHAS)
  ref = _np_losses(layers, seg > 0, ALPHAS, e=16, k=4, d=4, m=2)
  for name in NAMES:
    assert _rel(got[name], ref[name]) <= 1e-5, (name, float(got[name]), ref[name])


def _balanced_routing(num_tokens):
  """16 experts on 4 devices, 4 per token on exactly 2 neighbouring devices, every expert chosen
  equally often, uniform scores."""
  experts = []
  for t in range(num_tokens):
    a, j = t % 4, (t // 4) % 2
    bdev = (a + 1) % 4
    experts.append([4 * a + 2 * j, 4 * a + 2 * j + 1, 4 * bdev + 2 * j, 4 * bdev + 2 * j + 1])
  experts = np.asarray(experts, np.int32)
  scores = np.full((num_tokens, 16), 1.0 / 16, np.float32)
  return RouterOutput(jnp.asarray(scores), jnp.asarray(experts),
                      jnp.full(experts.shape, 0.25, jnp.float32))


def test_perfectly_balanced_routing_gives_one():
  cfg = get_config("tiny", n_routed_experts=16, num_experts_per_tok=4, routing_devices=4,
                   routing_device_limit=2)
  b, t = 2, 16
  r = _balanced_routing(b * t)
  stats = jax.tree.map(lambda a: a[None], router_stats(r, jnp.ones((b, t), jnp.int32), 4))
  np.testing.assert_array_equal(np.asarray(stats["count"][0]), np.full((b, 16), 4.0))
  np.testing.assert_array_equal(np.asarray(stats["device_count"][0]), np.full((b, 4), 8.0))
  terms = balance_terms(stats, cfg)
  for key in ("expert", "device", "comm"):
    np.testing.assert_allclose(np.asarray(terms[key]), 1.0, rtol=1e-6)
  losses = balance_losses([stats], cfg, ALPHAS)
  np.testing.assert_allclose([float(losses[n]) for n in NAMES],
                             [ALPHAS.expert_alpha, ALPHAS.device_alpha, ALPHAS.comm_alpha],
                             rtol=1e-6)


def test_uniform_scores_give_expert_term_one_and_skew_raises_it():
  cfg = get_config("tiny", n_routed_experts=16, num_experts_per_tok=4, routing_devices=4,
                   routing_device_limit=2)
  b, t = 3, 16
  rng = np.random.default_rng(9)
  valid = jnp.ones((b, t), jnp.int32)
  # Constant (random, non-zero) logits per token: uniform scores; whatever top-k picks, the
  # expert term is (1/E) sum_i f_i = 1.
  const = np.repeat(rng.normal(size=(b * t, 1)) * 3, 16, axis=1)
  r = route(jnp.asarray(const, jnp.float32), cfg)
  np.testing.assert_allclose(np.asarray(r.scores_NE), 1.0 / 16, rtol=1e-6)
  stats = jax.tree.map(lambda a: a[None], router_stats(r, valid, 4))
  np.testing.assert_allclose(np.asarray(balance_terms(stats, cfg)["expert"]), 1.0, rtol=1e-6)
  # Scores concentrated on the experts that are also chosen most: above the minimum.
  skew = rng.normal(size=(b * t, 16))
  skew[:, :4] += 4.0
  r = route(jnp.asarray(skew, jnp.float32), cfg)
  stats = jax.tree.map(lambda a: a[None], router_stats(r, valid, 4))
  assert np.all(np.asarray(balance_terms(stats, cfg)["expert"]) > 1.5)
