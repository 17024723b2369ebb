"""Tests for coder_jax.data.tokenizer: BPE training, round trips, loading, SeqIO vocabulary, CLI."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import sysconfig

import pytest
import tokenizers

from coder_jax.data import tokenizer as tk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN_FILES = 200
N_ROUND_TRIP_FILES = 400
TRICKY = [
    "",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\r\nCRLF\r\n",
    "emoji 😀🐍 and 中文 and café",
    "\x00",
    "\x00\x01\x7f\u200b\ufeff",
    "x = 1234567890  # digits",
    "spaces before punctuation: a , b . c 's do n't ?",
    "def f():\n\n\n    return  None\n",
    "ends with eos " + tk.EOS,
    tk.FIM_BEGIN + "prefix" + tk.FIM_HOLE + "suffix" + tk.FIM_END + "middle",
    tk.BOS + "text",
]


def _stdlib_py_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return out


def _read_utf8(path: str) -> str | None:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None  # a few stdlib test files are deliberately latin-1


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
  files = _stdlib_py_files()
  texts = [t for t in (_read_utf8(p) for p in files[:N_TRAIN_FILES]) if t is not None]
  round_trip = [t for t in (_read_utf8(p) for p in files[:N_ROUND_TRIP_FILES]) if t]
  # Files with non-ASCII text from anywhere in the stdlib (the sorted prefix may have few).
  non_ascii = []
  for p in files[N_ROUND_TRIP_FILES:]:
    t = _read_utf8(p)
    if t and not t.isascii():
      non_ascii.append(t)
      if len(non_ascii) >= 10:
        break
  return {"train": texts, "round_trip": round_trip + non_ascii, "non_ascii": non_ascii}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[tokenizers.Tokenizer, str]:
  out = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tok = tk.train_tokenizer(corpus["train"], vocab_size=1000, out_path=out)
  return tok, out


@pytest.fixture(scope="module")
def vocab(trained):
  return tk.make_vocabulary(trained[1])


def test_special_token_strings():
  assert tk.BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
  assert tk.EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
  assert tk.FIM_BEGIN == "<\uff5cfim\u2581begin\uff5c>"
  assert tk.FIM_HOLE == "<\uff5cfim\u2581hole\uff5c>"
  assert tk.FIM_END == "<\uff5cfim\u2581end\uff5c>"
  assert tk.SPECIAL_TOKENS == (tk.BOS, tk.EOS, tk.FIM_BEGIN, tk.FIM_HOLE, tk.FIM_END)


def test_trained_layout_and_specials(trained):
  tok, path = trained
  assert tok.get_vocab_size(with_added_tokens=True) == 1000
  ids = [tok.token_to_id(t) for t in tk.TRAINED_SPECIAL_TOKENS]
  assert ids == [0, 1, 2, 3, 4, 5]
  for t in tk.TRAINED_SPECIAL_TOKENS:
    assert tok.encode(t, add_special_tokens=False).ids == [tok.token_to_id(t)]
  loaded = tk.load_tokenizer(path)
  assert loaded.to_str() == tok.to_str()
  assert tk.load_tokenizer(os.path.dirname(path)).to_str() == tok.to_str()


def test_round_trip_stdlib_files(vocab, corpus):
  assert len(corpus["round_trip"]) > 350
  assert corpus["non_ascii"], "expected some non-ASCII stdlib files"
  encs = vocab.tokenizer.encode_batch(corpus["round_trip"], add_special_tokens=False)
  for text, enc in zip(corpus["round_trip"], encs):
    assert vocab.decode(enc.ids) == text
  for text in corpus["non_ascii"]:
    assert vocab.decode(vocab.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(vocab, text):
  assert vocab.decode(vocab.encode(text)) == text


def test_eos_semantics(vocab):
  # A literal special-token string in document text stays text (no control id), round trips,
  # and SeqIO's decode stops after a real EOS id.
  text = "a" + tk.EOS + "b" + tk.FIM_HOLE
  ids = vocab.encode(text)
  assert not {vocab.eos_id, vocab.fim_hole_id, vocab.bos_id} & set(ids)
  assert vocab.decode(ids) == text
  assert vocab.decode(vocab.encode("a") + [vocab.eos_id] + vocab.encode("b")) == "a" + tk.EOS
  # Padding ids decode to nothing.
  assert vocab.decode(vocab.encode("xy") + [vocab.pad_id] * 3) == "xy"


def test_vocabulary_properties(vocab):
  assert vocab.vocab_size == 1000
  assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
  assert (vocab.fim_begin_id, vocab.fim_hole_id, vocab.fim_end_id) == (3, 4, 5)
  assert vocab.unk_id is None and vocab.extra_ids == 0
  specials = [vocab.tokenizer.token_to_id(t) for t in tk.SPECIAL_TOKENS]
  assert specials == [vocab.bos_id, vocab.eos_id, vocab.fim_begin_id, vocab.fim_hole_id,
                      vocab.fim_end_id]
  specials = [[i] for i in specials]
  assert len({s[0] for s in specials}) == len(specials)
  with pytest.raises(ValueError, match="1000"):
    vocab.decode([1000])
  with pytest.raises(ValueError, match="-1"):
    vocab.decode([-1])


def test_compression(trained, corpus):
  tok, _ = trained
  held_out = corpus["round_trip"][N_TRAIN_FILES:]
  assert tk.chars_per_token(tok, corpus["train"]) > 2.5
  assert tk.chars_per_token(tok, held_out) > 2.5


def test_tf_encode_decode(vocab):
  import tensorflow as tf
  texts = ["def main():\n    pass\n", "", "héllo 😀\r\n", tk.FIM_HOLE + "x"]
  for t in texts:
    ids = vocab.encode_tf(tf.constant(t))
    assert ids.dtype == tf.int32 and ids.shape.rank == 1
    assert ids.numpy().tolist() == vocab.encode(t)
    assert vocab.decode_tf(ids).numpy().decode("utf-8") == t
  batched = vocab.encode_tf(tf.constant(texts))
  assert batched.to_list() == [vocab.encode(t) for t in texts]
  # Dense padded batch, as a model would emit; decoding stops at EOS.
  dense = batched.to_tensor(default_value=vocab.pad_id)
  assert [b.decode("utf-8") for b in vocab.decode_tf(dense).numpy()] == texts
  cut = tf.constant([vocab.encode("ab") + [vocab.eos_id] + vocab.encode("cd")])
  assert vocab.decode_tf(cut).numpy()[0].decode("utf-8") == "ab" + tk.EOS

  # Inside a tf.data graph, as SeqIO's tokenize preprocessor runs it.
  ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
  assert [x.tolist() for x in ds.as_numpy_iterator()] == [vocab.encode(t) for t in texts]


def test_pickle_and_equality(vocab, trained, tmp_path):
  for clone in (pickle.loads(pickle.dumps(vocab)), copy.deepcopy(vocab)):
    assert type(clone) is type(vocab)
    assert clone == vocab and hash(clone) == hash(vocab)
    assert clone.encode("print(1)") == vocab.encode("print(1)")
  assert isinstance(vocab, tk.HFTokenizerVocabulary)
  # Same content at another path is equal; a different vocabulary is not.
  other = tmp_path / "copy.json"
  other.write_text(trained[0].to_str())
  assert tk.make_vocabulary(str(other)) == vocab
  retrained = tk.train_tokenizer(["x = 1\n" * 50, "y = 2\n" * 50], 300,
                                 out_path=str(tmp_path / "small.json"))
  assert retrained.get_vocab_size() <= 300
  assert tk.make_vocabulary(str(tmp_path / "small.json")) != vocab


def test_load_errors(tmp_path):
  missing = tmp_path / "nope.json"
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tk.load_tokenizer(str(missing))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tk.make_vocabulary(str(missing))

  not_tok = tmp_path / "config.json"
  not_tok.write_text(json.dumps({"hidden_size": 8}))
  with pytest.raises(ValueError, match="config.json"):
    tk.load_tokenizer(str(not_tok))
  garbage = tmp_path / "garbage.json"
  garbage.write_bytes(b"\xff\xfe not json")
  with pytest.raises(ValueError, match="garbage.json"):
    tk.load_tokenizer(str(garbage))
  bad_model = tmp_path / "bad_model.json"
  bad_model.write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
  with pytest.raises(ValueError, match="bad_model.json"):
    tk.load_tokenizer(str(bad_model))

  # A real tokenizer.json that has BOS/EOS but no FIM tokens.
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[tk.BOS, tk.EOS], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["import os\n"] * 10, trainer)
  no_fim = tmp_path / "no_fim.json"
  tok.save(str(no_fim))
  with pytest.raises(ValueError, match=tk.FIM_BEGIN):
    tk.load_tokenizer(str(no_fim))


def test_vocab_size_too_small():
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_tokenizer(["abc"], vocab_size=262)
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_tokenizer(["abc"], vocab_size=10)


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_import_does_not_load_tensorflow():
  code = ("import sys, coder_jax.data.tokenizer as t; "
          "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules, 'TF imported'")
  subprocess.run([sys.executable, "-c", code], check=True, env=_env(), cwd=REPO, timeout=60)


def test_cli(tmp_path):
  src = tmp_path / "src"
  (src / "pkg").mkdir(parents=True)
  for i in range(6):
    (src / "pkg" / f"m{i}.py").write_text(
        f"def func_{i}(x):\n    return x * {i} + 1\n\n\nclass C{i}:\n    pass\n" * 20)
  (src / "README.md").write_text("# Title\n\nSome words here, é.\n" * 10)
  (src / "blob.bin").write_bytes(b"\x00\x01\x02binary")
  (src / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
  out = tmp_path / "out" / "tokenizer.json"
  res = subprocess.run(
      [sys.executable, "-m", "coder_jax.data.tokenizer", "--source", str(src),
       "--vocab_size", "320", "--out", str(out), "--max_docs", "50"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stderr
  assert "trained on 7 files" in res.stdout
  assert "vocab size:" in res.stdout and "chars/token" in res.stdout
  assert f"{tk.EOS}=2" in res.stdout
  tok = tk.load_tokenizer(str(out))
  text = (src / "pkg" / "m3.py").read_text()
  assert tok.decode(tok.encode(text, add_special_tokens=False).ids,
                    skip_special_tokens=False) == text

  bad = subprocess.run(
      [sys.executable, "-m", "coder_jax.data.tokenizer", "--source", str(src),
       "--vocab_size", "100", "--out", str(tmp_path / "x.json")],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
  assert bad.returncode != 0 and "vocab_size" in bad.stderr


def test_deepseek_layout_without_pad(tmp_path):
  # DeepSeek's released vocab puts specials after the merges; with no pad token id 0 stays text.
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["import os\n"] * 10, trainer)
  n = tok.get_vocab_size()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in tk.SPECIAL_TOKENS])
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  v = tk.make_vocabulary(str(tmp_path))
  assert (v.bos_id, v.eos_id, v.fim_end_id) == (n, n + 1, n + 4)
  assert v.pad_id == 0 and v.vocab_size == n + 5
  assert v.decode([0, 0]) == tok.id_to_token(0) * 2  # "!!": not treated as padding
  assert v.decode(v.encode("import os\n" + tk.EOS)) == "import os\n" + tk.EOS
