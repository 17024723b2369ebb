"""Needle in a haystack: flags, prompts of exactly the asked length with the needle where the
depth says, scoring, the PNG heat map (read back by TensorFlow's decoder), and the command line
on a tiny checkpoint (files written; too-long windows refused before the weights load)."""

import json
import os
import re
import shutil
import time
import types

import numpy as np
import pytest

from coder_jax.eval import niah
from coder_jax.eval.__main__ import run

SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The secret number is 1234.\nWhat is the secret number?\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
] * 4


@pytest.fixture(scope="module")
def tok():
  from coder_jax.data.tokenizer import train_tokenizer
  return train_tokenizer(SNIPPETS, 400)


@pytest.fixture(scope="module")
def hay_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("hay") / "hay.txt"
  path.write_text("".join(f"row {i} of the filler: x = {i % 7} + y\n" for i in range(400)))
  return str(path)


def test_flags():
  assert niah.parse_lengths("1k,2k,512,4K,1k") == [512, 1024, 2048, 4096]
  assert niah.parse_lengths("128k") == [131072]
  for bad in ("1.5k", "abc", "0", "1k,", "-5"):
    with pytest.raises(ValueError, match="--lengths: .* is not a length"):
      niah.parse_lengths(bad)
  assert niah.parse_depths("1,0,0.25") == [0.0, 0.25, 1.0]
  with pytest.raises(ValueError, match=r"--depths: 1.5 is outside \[0, 1\]"):
    niah.parse_depths("0,1.5")
  with pytest.raises(ValueError, match="--depths: 'half' is not a number"):
    niah.parse_depths("half")
  with pytest.raises(ValueError, match="--lengths: 4096 is beyond max_position_embeddings=2048 "
                                       "of m"):
    niah.check_lengths([1024, 4096], 2048, "m")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_length_and_the_needle_where_the_depth_says(tok, hay_file, depth):
  hay = niah.Haystack(tok, hay_file)
  ids, pos, actual = niah.build_prompt(tok, hay, length=300, depth=depth, number=4821,
                                       max_new_tokens=8, bos_id=1)
  assert len(ids) == 300 - 8 and ids[0] == 1
  text = tok.decode(ids[1:])
  assert text.count("The secret number is 4821.") == 1
  assert text.endswith(niah.QUESTION)
  before = tok.decode(ids[1:pos])
  # On a line of its own: the haystack before it ends a line (or is empty); at depth 1 it
  # follows the cut last line and opens a new one itself.
  if depth == 1.0:
    assert tok.decode(ids[pos:]).startswith("\nThe secret")
  else:
    assert before == "" or before.endswith("\n")
  assert tok.decode(ids[pos:]).lstrip("\n").startswith("The secret number is 4821.")
  filler = len(ids) - 1 - len(tok.encode("\n" * (depth == 1) + niah.needle_text(4821)).ids) \
      - len(tok.encode(niah.QUESTION).ids)
  assert actual == (pos - 1) / filler
  if depth == 0:
    assert pos == 1
  elif depth == 1:
    assert actual == 1.0
  else:   # the line start nearest below the asked depth: within one filler line of it
    assert depth - 0.1 < actual <= depth
  # The same filler whatever the depth: removing the needle leaves a prefix of the haystack.
  needle_len = len(ids) - 1 - filler - len(tok.encode(niah.QUESTION).ids)
  rest = ids[1:pos] + ids[pos + needle_len:len(ids) - len(tok.encode(niah.QUESTION).ids)]
  assert rest == hay.take(filler)[0]


def test_too_short_window_names_the_numbers(tok, hay_file):
  with pytest.raises(ValueError, match=r"--lengths: 20 tokens leave no haystack: the needle and "
                                       r"question take \d+ and the answer 8"):
    niah.build_prompt(tok, niah.Haystack(tok, hay_file), length=20, depth=0.5, number=1234,
                      max_new_tokens=8, bos_id=1)


def test_score():
  assert niah.score(" 4821.\n", 4821) == 1.0
  assert niah.score(" 4820 or so", 4821) == 0.75
  assert niah.score("x = 1", 4821) == 0.0            # '1' vs '4'
  assert niah.score(" no idea", 4821) == 0.0
  assert niah.score(" 48211", 4821) == 0.8              # longer: 4 of its 5 digits in place
  assert niah.score(" 482", 4821) == 0.75


def _fake_model(monkeypatch, tok, answer):
  """A 'model' that answers from the prompt it is given: answer(number) -> the text it says."""
  from coder_jax import decode

  def generate_ids(model, prompts, *, max_new_tokens, **kw):
    out = []
    for p in prompts:
      assert len(p) + max_new_tokens <= model.cfg.max_position_embeddings
      number = int(re.search(r"The secret number is (\d+)\.", tok.decode(p)).group(1))
      out.append(tok.encode(answer(number)).ids[:max_new_tokens])
    return types.SimpleNamespace(tokens=out)

  monkeypatch.setattr(decode, "generate_ids", generate_ids)
  return types.SimpleNamespace(cfg=types.SimpleNamespace(max_position_embeddings=512))


def test_scores_follow_the_answers(monkeypatch, tok, hay_file):
  model = _fake_model(monkeypatch, tok, lambda n: f" {n}.")
  r = niah.run_niah(model, tok, [128, 512], [0.0, 0.5, 1.0], haystack=hay_file)
  assert r["scores"] == [[1.0] * 3] * 2 and r["mean_score"] == 1.0 and len(r["cells"]) == 6
  numbers = {c["number"] for c in r["cells"]}
  assert len(numbers) > 1 and all(1000 <= n <= 9999 for n in numbers)
  wrong_last = _fake_model(monkeypatch, tok, lambda n: f" {n - n % 10 + (n + 1) % 10}.")
  r = niah.run_niah(wrong_last, tok, [128], [0.0, 1.0], haystack=hay_file)
  assert r["scores"] == [[0.75, 0.75]]
  with pytest.raises(ValueError, match="1024 is beyond max_position_embeddings=512"):
    niah.run_niah(model, tok, [1024], [0.5], haystack=hay_file)


def test_heat_map_png_reads_back():
  tf = pytest.importorskip("tensorflow")
  scores = [[0.0, 0.5, 1.0, 0.25], [1.0, 1.0, 0.75, 0.0]]   # [length][depth]
  lengths, depths = [1024, 131072], [0.0, 0.25, 0.5, 1.0]
  img = niah.heatmap(scores, lengths, depths)
  back = tf.io.decode_png(niah.png_bytes(img), channels=3).numpy()
  np.testing.assert_array_equal(back, img)
  assert niah.color(0.0) == (215, 48, 39) and niah.color(1.0) == (26, 152, 80)
  assert niah.color(0.5) == (254, 224, 139)
  # Cell (depth i, length j) is coloured by its score: find each colour's cells.
  for j, row in enumerate(scores):
    for i, s in enumerate(row):
      ys, xs = np.nonzero(np.all(img == niah.color(s), axis=-1))
      assert ys.size > 100, (i, j)
  # Depth runs down the rows, length across the columns.
  red = np.all(img == niah.color(0.0), axis=-1)
  red &= red.sum(axis=0, keepdims=True) >= 10      # whole cells, not the colour bar's last row
  ys, xs = np.nonzero(red)
  first, second = xs < xs.mean(), xs >= xs.mean()
  assert ys[first].mean() < ys[second].mean()     # 0.0 at depth 0 (length 1k), depth 1 (128k)


def _checkpoint(root, max_positions):
  from coder_jax import hf
  from coder_jax.data.tokenizer import train_tokenizer
  from coder_jax.model import get_config, init_model
  model = init_model(get_config("tiny", vocab_size=512, max_position_embeddings=max_positions))
  path = hf.save(model, str(root))
  train_tokenizer(SNIPPETS, 400).save(os.path.join(path, "tokenizer.json"))
  return path


def test_cli_writes_json_and_png(tmp_path, capsys):
  ckpt = _checkpoint(tmp_path / "hf", 512)
  out = tmp_path / "out"
  assert run(["niah", "--checkpoint", ckpt, "--lengths", "128,256", "--depths", "0,0.5,1",
              "--out", str(out), "--max_new_tokens", "6"]) == 0
  r = json.loads((out / "niah.json").read_text())
  assert r["lengths"] == [128, 256] and r["depths"] == [0.0, 0.5, 1.0]
  assert np.shape(r["scores"]) == (2, 3) and all(0 <= s <= 1 for row in r["scores"] for s in row)
  assert r["max_position_embeddings"] == 512 and len(r["cells"]) == 6
  png = (out / "niah.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "mean score" in printed and "niah.png" in printed


def test_cli_refuses_a_window_beyond_the_model_before_loading(tmp_path, capsys):
  ckpt = _checkpoint(tmp_path / "hf", 512)
  # Weights gone: only the length check (which reads config.json) can answer.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(ckpt, "config.json"), bare / "config.json")
  t0 = time.time()
  assert run(["niah", "--checkpoint", str(bare), "--lengths", "256,1k,2k",
              "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ValueError: --lengths: 1024, 2048 are "
                                              "beyond max_position_embeddings=512"), err
  assert time.time() - t0 < 10 and not (tmp_path / "o").exists()
  assert run(["niah", "--checkpoint", str(tmp_path / "none"), "--lengths", "1k",
              "--out", str(tmp_path / "o")]) == 2
  assert "no such file or directory" in capsys.readouterr().err
