"""FIM: exact token layout, rate, determinism, split points at character level."""

import numpy as np
import pytest

from coder_jax.data.fim import FimConfig, FimIds, fim_tokens, plan

IDS = FimIds(fim_begin=-1, fim_hole=-2, fim_end=-3)


def encode(s):  # a stand-in tokenizer: one id per character
  return [ord(c) for c in s]


def test_psm_layout_is_token_exact():
  cfg = FimConfig(rate=1.0)
  text = "def add(a, b):\n    return a + b\n"
  for i in range(50):
    key = f"doc{i}"
    mode, (prefix, middle, suffix) = plan(text, key, cfg)
    assert mode == "psm" and prefix + middle + suffix == text
    assert fim_tokens(text, key, cfg, IDS, encode) == (
        [-1] + encode(prefix) + [-2] + encode(suffix) + [-3] + encode(middle))


def test_spm_layout_is_token_exact():
  cfg = FimConfig(rate=1.0, spm_rate=1.0)
  text = "int main(void) { return 0; }"
  mode, (prefix, middle, suffix) = plan(text, "k", cfg)
  assert mode == "spm"
  assert fim_tokens(text, "k", cfg, IDS, encode) == (
      [-1, -2] + encode(suffix) + [-3] + encode(prefix + middle))


def test_plain_documents_are_just_encoded():
  assert fim_tokens("x = 1", "k", FimConfig(rate=0.0), IDS, encode) == encode("x = 1")


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.9])
def test_rate_over_10000_documents(rate):
  cfg = FimConfig(rate=rate, seed=3)
  n = sum(plan("some text", f"doc-{i}", cfg)[0] != "plain" for i in range(10_000))
  assert abs(n / 10_000 - rate) <= 0.02


def test_spm_share_and_split_points_cover_the_document():
  cfg = FimConfig(rate=1.0, spm_rate=0.3, seed=1)
  text = "abcdefghij" * 3
  modes, cuts = [], set()
  for i in range(2000):
    mode, (p, m, s) = plan(text, str(i), cfg)
    modes.append(mode)
    cuts.update((len(p), len(p) + len(m)))
  assert abs(modes.count("spm") / 2000 - 0.3) < 0.04
  assert cuts == set(range(len(text) + 1))  # every character boundary, both ends included


def test_character_level_splits_keep_unicode_whole():
  text = "naïve → 日本語 🐍"
  for i in range(200):
    _, (p, m, s) = plan(text, str(i), FimConfig(rate=1.0))
    assert p + m + s == text  # str slicing: never inside a code point


def test_deterministic_per_key_not_order():
  cfg = FimConfig(rate=0.5, seed=7)
  a = [plan("hello world", f"k{i}", cfg) for i in range(100)]
  b = [plan("hello world", f"k{i}", cfg) for i in reversed(range(100))][::-1]
  assert a == b
  other_seed = [plan("hello world", f"k{i}", FimConfig(rate=0.5, seed=8)) for i in range(100)]
  assert a != other_seed


def test_empty_document_and_bad_rates():
  mode, pieces = plan("", "k", FimConfig(rate=1.0))
  assert pieces == ("", "", "")
  with pytest.raises(ValueError, match="^rate:"):
    FimConfig(rate=1.5)
  with pytest.raises(ValueError, match="^spm_rate:"):
    FimConfig(spm_rate=-0.1)
