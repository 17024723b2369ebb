"""Faults a user can run into with the data pipeline (issue 17): a user's corpus is what trains,
several corpora are chosen explicitly, a huge document costs bounded memory, bad CLI paths are
one-line errors, and a stream names the tokenizer its batches were made with."""

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from coder_jax.data import __main__ as cli
from coder_jax.data import corpus as corpus_mod
from coder_jax.data.cuts import chunk_bounds, chunks
from coder_jax.data.layout import STATS_NAME, corpora
from coder_jax.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from coder_jax.train.data import CodeData, SyntheticData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
OPEN = dict(model_vocab=512, batch_rows=2, seq_len=64, shard=0, num_shards=1, start_batch=0)


def _source(root, word: str, files: int = 6):
  """A small ASCII corpus whose every line names `word`, so batches show where they came from."""
  root.mkdir(parents=True)
  for i in range(files):
    body = "".join(f"def {word}_{i}_{j}(x):\n    return x * {j} + {i}  # {word}\n"
                   for j in range(40))
    (root / f"{word}_{i}.py").write_text(body)
  return root


def _tree(path) -> list:
  """Every file under path with its size and modification time: what 'nothing changed' means."""
  out = []
  for d, _, files in os.walk(path):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out.append((os.path.relpath(os.path.join(d, f), path), st.st_size, st.st_mtime_ns))
  return sorted(out)


def _segments(stream, tok, batches: int = 3) -> list[str]:
  texts = []
  for _ in range(batches):
    b = next(stream)
    for row in range(b["targets"].shape[0]):
      seg = b["segment_ids"][row]
      for s in sorted(set(seg.tolist()) - {0}):
        ids = b["targets"][row][seg == s].tolist()
        texts.append(tok.decode(ids, skip_special_tokens=False).replace(EOS, ""))
  return texts


def _text_of(src) -> str:
  return "\n".join(p.read_text() for p in sorted(src.iterdir()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """one: DATA_DIR holding the user's corpus `alpha`; two: alpha and then `beta` built into it."""
  root = tmp_path_factory.mktemp("faults")
  alpha, beta = _source(root / "alpha", "alpha"), _source(root / "beta", "beta")
  names = {}
  for data, srcs in (("one", [alpha]), ("two", [alpha, beta])):
    for src in srcs:
      rc = cli.main(["build", "--source", str(src), "--out", str(root / data),
                     "--vocab_size", "400"])
      assert rc == 0
      names[src.name] = os.path.basename(os.path.dirname(_dataset_of(root / data, src)))
  return dict(root=root, alpha=alpha, beta=beta, one=root / "one", two=root / "two", names=names)


def _dataset_of(data, src) -> str:
  """The dataset directory in DATA_DIR whose build_stats name `src` as its source."""
  for d in corpora(str(data)):
    with open(os.path.join(d, STATS_NAME)) as fh:
      if json.load(fh)["sources"] == [str(src)]:
        return d
  raise AssertionError(f"no build of {src} in {data}")


def test_a_user_built_corpus_is_what_trains(built):
  before = _tree(built["one"])
  stream = CodeData(data_dir=str(built["one"]), fim_rate=0.0).open(**OPEN)
  try:
    assert stream.tokenizer_path == os.path.join(str(built["one"]), "tokenizer.json")
    texts = _segments(stream, load_tokenizer(stream.tokenizer_path))
  finally:
    stream.close()
  corpus = _text_of(built["alpha"])
  assert texts and all(t in corpus for t in texts)  # every token came from the user's files
  assert sum("alpha" in t for t in texts) > len(texts) // 2
  assert _tree(built["one"]) == before  # no default corpus (or anything else) built beside it


def test_several_corpora_are_chosen_explicitly_never_guessed(built, capsys):
  two = str(built["two"])
  before = _tree(two)
  with pytest.raises(ValueError, match="holds 2 corpora") as err:
    CodeData(data_dir=two).open(**OPEN)
  msg = str(err.value)
  assert "\n" not in msg and "CodeData.dataset" in msg and "--dataset" in msg
  for word in ("alpha", "beta"):  # each listed by name and by its sources
    assert built["names"][word] in msg and str(built[word]) in msg
  # By name, and by the same sources (reused, not rebuilt): each reads its own corpus.
  for data in (CodeData(data_dir=two, dataset=built["names"]["beta"], fim_rate=0.0),
               CodeData(data_dir=two, sources=(str(built["alpha"]),), fim_rate=0.0)):
    word = "beta" if data.dataset else "alpha"
    stream = data.open(**OPEN)
    try:
      texts = _segments(stream, load_tokenizer(stream.tokenizer_path))
    finally:
      stream.close()
    assert texts and all(t in _text_of(built[word]) for t in texts), word
  with pytest.raises(ValueError, match="both set"):
    CodeData(data_dir=two, dataset="x", sources=(str(built["alpha"]),)).open(**OPEN)
  with pytest.raises(ValueError, match=r"^dataset: 'src_nosuch' is not a corpus built in"):
    CodeData(data_dir=two, dataset="src_nosuch").open(**OPEN)
  # The CLI too: several corpora need --dataset; with it, that corpus is shown.
  assert cli.main(["show", "--data_dir", two, "--seq_len", "64", "--num", "1"]) == 2
  assert "holds 2 corpora" in capsys.readouterr().err
  assert cli.main(["show", "--data_dir", two, "--dataset", built["names"]["beta"], "--seq_len",
                   "64", "--num", "2", "--fim_rate", "0"]) == 0
  out = capsys.readouterr().out
  assert "beta" in out and "alpha" not in out
  assert _tree(two) == before


def test_default_corpus_goes_only_into_an_empty_data_dir(built, tmp_path, monkeypatch):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=r"^DATA_DIR: .* holds no built corpus but is not empty "
                                       r"\(notes.txt\)"):
    CodeData(data_dir=str(mine)).open(**OPEN)
  assert _tree(mine) == [("notes.txt", 7, os.stat(mine / "notes.txt").st_mtime_ns)]
  # A new DATA_DIR gets the default corpus (a small stand-in here), once.
  monkeypatch.setattr(corpus_mod, "default_sources", lambda **_: [str(built["beta"])])
  fresh = tmp_path / "fresh"
  from coder_jax.data.builder import config_name
  # What a first run killed while building leaves behind does not count as the user's files.
  (fresh / "code_corpus" / config_name([str(built["beta"])]) / "1.0.0.incomplete").mkdir(
      parents=True)
  for _ in range(2):
    stream = CodeData(data_dir=str(fresh), vocab_size=300, fim_rate=0.0).open(**OPEN)
    texts = _segments(stream, load_tokenizer(stream.tokenizer_path), batches=1)
    stream.close()
    assert texts and all(t in _text_of(built["beta"]) for t in texts)
    assert len(corpora(str(fresh))) == 1


def test_streams_name_their_tokenizer(built):
  synthetic = SyntheticData().open(**OPEN)
  assert synthetic.tokenizer_path is None
  stream = CodeData(data_dir=str(built["one"]), tokenizer=str(built["one"])).open(**OPEN)
  assert stream.tokenizer_path == os.path.join(str(built["one"]), "tokenizer.json")
  stream.close()


def test_chunked_encoding_and_tokenizer_training_match_the_whole(tmp_path, monkeypatch):
  """Long texts are encoded and fed to the trainer in pieces (cuts.py); on real code the ids and
  the trained tokenizer are those of the whole texts."""
  import coder_jax.data.tokenizer as tk
  texts = [open(os.path.join(STDLIB, n), encoding="utf-8").read()
           for n in ("argparse.py", "textwrap.py", "json/decoder.py", "heapq.py")]
  for t in texts:
    bounds = list(chunk_bounds(t, 2048))
    assert len(bounds) > 3 and all(0 < b - a <= 2048 for a, b in bounds)
    assert "".join(chunks(t, 2048)) == t
  path = str(tmp_path / "tokenizer.json")
  whole = train_tokenizer(texts, 600, path)
  pieces = train_tokenizer((p for t in texts for p in chunks(t, 2048)), 600)
  assert pieces.to_str() == whole.to_str()
  monkeypatch.setattr(tk, "ENCODE_CHUNK_CHARS", 2048)
  vocab = tk.make_vocabulary(path)
  whole.encode_special_tokens = True  # as the vocabulary encodes document text
  for t in texts:
    assert vocab.encode(t) == whole.encode(t, add_special_tokens=False).ids


def test_long_documents_are_stored_as_parts_in_one_split(tmp_path):
  import tensorflow_datasets as tfds
  from coder_jax.data.builder import build
  src = tmp_path / "src"
  src.mkdir()
  big = "".join(f"value_{i} = compute({i}, 'x' * {i % 7})\n" for i in range(400))
  (src / "big.py").write_text(big)
  (src / "small.py").write_text("print('small')\n")
  dataset_dir, stats = build([str(src)], str(tmp_path / "data"), max_doc_chars=3000,
                             max_file_bytes=1 << 20, validation_fraction=0.0)
  n = -(-len(big) // 3000)
  assert stats["cut_documents"] == 1 and stats["documents"] >= n + 1
  ex = list(tfds.builder_from_directory(dataset_dir).as_dataset(split="train_python")
            .as_numpy_iterator())
  parts = {e["key"].decode(): e["text"].decode() for e in ex if b"#" in e["key"]}
  count = len(parts)
  assert count >= n and all(len(t) <= 3000 for t in parts.values())
  assert "".join(parts[f"src/big.py#{i}/{count}"] for i in range(1, count + 1)) == big
  assert all(t.endswith("\n") for t in list(parts.values())[:-1])  # cut between lines


_MEMORY_CHILD = r"""
import json, os, resource, sys
import numpy, seqio, tensorflow, tensorflow_datasets, tokenizers  # fixed cost, before the baseline
from coder_jax.data import __main__ as cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = cli.main(sys.argv[1:])
sys.stdout.flush()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rc": rc, "growth_mb": (peak - base) / 1024}))
"""


def _peak_growth(argv) -> tuple[dict, str]:
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, *argv], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


@pytest.mark.slow
def test_a_huge_single_line_file_costs_bounded_memory(tmp_path):
  """A 3 MB one-line file (a minified bundle). Before the fix, memory grew with the document:
  this file took +673 MB to build and +2,205 MB to show 3 rows over what the imports take (the
  issue's 50 MB file: 12.2 / 24.4 GB); now +84 / +152 MB, as documents are stored in parts of at
  most 1 Mi characters and encoded 64 Ki characters at a time."""
  rng = np.random.default_rng(0)
  words = [f"var a{a}=f(b{b},\"s{c}\");" for a, b, c in rng.integers(0, 99999, (100_000, 3))]
  src = tmp_path / "src"
  src.mkdir()
  (src / "bundle.min.js").write_text("".join(words) + "\n")
  size = os.path.getsize(src / "bundle.min.js")
  assert size > 2_900_000
  data = tmp_path / "data"
  build, _ = _peak_growth(["build", "--source", str(src), "--out", str(data), "--vocab_size",
                           "400", "--max_file_bytes", str(1 << 26), "--validation_fraction", "0"])
  show, printed = _peak_growth(["show", "--data_dir", str(data), "--seq_len", "256", "--num", "3"])
  assert build["rc"] == show["rc"] == 0 and printed.count("=== row") == 3
  (stats_path,) = [os.path.join(d, "build_stats.json") for d, _, f in os.walk(data)
                   if "build_stats.json" in f]
  with open(stats_path) as fh:
    stats = json.load(fh)
  parts = -(-size // (1 << 20))
  assert stats["cut_documents"] == 1 and parts <= stats["documents"] <= parts + 1
  assert build["growth_mb"] < 400, build
  assert show["growth_mb"] < 400, show


def _cli_cases(root, built):
  """(argv, text the one-line error must hold) for bad paths and values of the data CLIs."""
  a_file = root / "a_file"
  a_file.write_text("not a directory")
  not_tok = root / "not_tokenizer.json"
  not_tok.write_text("{}")
  empty = root / "empty"
  empty.mkdir()
  other_tok = str(root / "other.json")
  train_tokenizer(["x = 1\n"] * 3, 300, other_tok)
  src, one, two = str(built["alpha"]), str(built["one"]), str(built["two"])
  out = str(root / "new_out")
  return [
      (["build", "--source", src, "--out", str(a_file)], "--out"),
      (["build", "--source", src, "--out", str(a_file / "sub")], "--out"),
      (["build", "--source", str(root / "missing"), "--out", out], "--source"),
      (["build", "--source", src, "--out", out, "--tokenizer", str(root / "missing.json")],
       "--tokenizer"),
      (["build", "--source", src, "--out", out, "--tokenizer", str(not_tok)], "--tokenizer"),
      (["build", "--source", src, "--out", one, "--tokenizer", other_tok],
       "--tokenizer: " + os.path.join(one, "tokenizer.json") + " exists and differs"),
      (["build", "--source", src, "--out", out, "--vocab_size", "10"], "--vocab_size"),
      (["build", "--source", src, "--out", out, "--max_file_bytes", "0"], "--max_file_bytes"),
      (["build", "--source", src, "--out", out, "--max_doc_chars", "1"], "--max_doc_chars"),
      (["build", "--source", src, "--out", out, "--validation_fraction", "1"],
       "--validation_fraction"),
      (["show", "--data_dir", str(a_file)], str(a_file)),
      (["show", "--data_dir", str(empty)], "no built corpus"),
      (["show", "--data_dir", str(root / "missing")], "no built corpus"),
      (["show", "--data_dir", two], "--dataset"),
      (["show", "--data_dir", two, "--dataset", "src_nosuch"], "src_nosuch"),
      (["show", "--data_dir", one, "--tokenizer", str(root / "missing.json")], "--tokenizer"),
      (["show", "--data_dir", one, "--tokenizer", str(not_tok)], "--tokenizer"),
      (["show", "--data_dir", one, "--split", "nosuch"], "split: this corpus has no 'nosuch'"),
      (["show", "--data_dir", one, "--seq_len", "0"], "seq_len"),
  ]


def test_cli_faults_are_one_line_errors_that_change_nothing(built, tmp_path, capsys):
  cases = _cli_cases(tmp_path, built)
  before = _tree(tmp_path), _tree(built["root"])
  for argv, needle in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
  assert (_tree(tmp_path), _tree(built["root"])) == before


def test_tokenizer_cli_refuses_an_unwritable_out_before_training(tmp_path, capsys):
  from coder_jax.data import tokenizer as tk
  for out in (tmp_path, tmp_path / "a_file" / "tokenizer.json"):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
      tk.main(["--source", os.path.join(STDLIB, "json"), "--vocab_size", "300",
               "--out", str(out)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err.splitlines()[-1]
  with pytest.raises(SystemExit):
    tk.main(["--source", str(tmp_path / "missing"), "--vocab_size", "300",
             "--out", str(tmp_path / "t.json")])
  assert "--source" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["a_file"]
