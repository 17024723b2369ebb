"""End to end: TFDS build -> SeqIO tasks -> FIM -> EOS -> packing, on a small real corpus."""

import collections
import os
import shutil
import sysconfig

import numpy as np
import pytest

from coder_jax.data import __main__ as cli
from coder_jax.data.builder import build
from coder_jax.data.corpus import BuildStats, default_sources, iter_documents
from coder_jax.data.fim import FimConfig, FimIds, fim_tokens
from coder_jax.data.pipeline import DataConfig, Pipeline
from coder_jax.data.tokenizer import load_tokenizer, make_vocabulary, train_tokenizer

STDLIB = sysconfig.get_paths()["stdlib"]
SEQ = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  src = root / "src"
  shutil.copytree(os.path.join(STDLIB, "json"), src / "json")
  for name in ("bisect.py", "colorsys.py", "keyword.py", "this.py", "stat.py"):
    shutil.copy(os.path.join(STDLIB, name), src / name)
  (src / "hello.c").write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
  (src / "Main.java").write_text("class Main { public static void main(String[] a) {} }\n")
  (src / "empty.py").write_text("")
  (src / "blob.bin").write_bytes(b"\x00\x01")
  dataset_dir, stats = build([str(src)], str(root / "data"), validation_fraction=0.2)
  tok = str(root / "tokenizer.json")
  stats_obj = BuildStats()
  texts = [d.text for d in iter_documents([str(src)], stats_obj)]
  train_tokenizer(texts, 700, tok)
  return dict(src=src, dataset_dir=dataset_dir, stats=stats, tok=tok, root=root)


def _cfg(corpus, **kw):
  base = dict(data_dir=corpus["dataset_dir"], tokenizer=corpus["tok"], seq_len=SEQ,
              batch_size=2, seed=0)
  return DataConfig(**{**base, **kw})


def _take(pipe, n):
  return [next(pipe) for _ in range(n)]


def test_build_statistics(corpus):
  s = corpus["stats"]
  assert s["skipped"] == {"empty": 1, "unknown_extension": 1}
  assert set(s["per_language"]) == {"python", "c", "java"}
  assert s["documents"] == sum(s["splits"].values()) == 12
  assert os.path.exists(os.path.join(corpus["dataset_dir"], "build_stats.json"))


def test_packed_rows_are_well_formed(corpus):
  vocab = make_vocabulary(corpus["tok"])
  for b in _take(Pipeline(_cfg(corpus)), 4):
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_weights"}
    for row in range(2):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      tgt, inp = b["targets"][row], b["inputs"][row]
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
        assert np.array_equal(pos[idx], np.arange(len(idx)))
        assert inp[idx[0]] == vocab.bos_id
        assert np.array_equal(inp[idx[1:]], tgt[idx[:-1]])  # inputs = targets shifted right
      pad = seg == 0
      assert not tgt[pad].any() and not b["loss_weights"][row][pad].any()
      assert b["loss_weights"][row][~pad].all()


def _segments(batches):
  out = []
  for b in batches:
    for row in range(b["targets"].shape[0]):
      seg = b["segment_ids"][row]
      for s in sorted(set(seg.tolist()) - {0}):
        out.append(tuple(b["targets"][row][seg == s].tolist()))
  return out


def _expected_pieces(corpus, lang, fim, split="train"):
  """Every document of the task, FIM-formatted + EOS, cut into SEQ-long pieces."""
  import tensorflow_datasets as tfds
  vocab = make_vocabulary(corpus["tok"])
  ids = FimIds(vocab.fim_begin_id, vocab.fim_hole_id, vocab.fim_end_id)
  builder = tfds.builder_from_directory(corpus["dataset_dir"])
  pieces = []
  for ex in builder.as_dataset(split=f"{split}_{lang}").as_numpy_iterator():
    toks = fim_tokens(ex["text"].decode(), ex["key"].decode(), fim, ids, vocab.encode)
    toks = toks + [vocab.eos_id]
    pieces += [tuple(toks[i:i + SEQ]) for i in range(0, len(toks), SEQ)]
  return pieces


def test_one_pass_loses_and_duplicates_no_token(corpus):
  fim = FimConfig(rate=0.5, seed=4)
  pipe = Pipeline(_cfg(corpus, batch_size=1, task="code_python", fim=fim), num_epochs=1)
  got = _segments(list(pipe))
  want = _expected_pieces(corpus, "python", fim)
  assert collections.Counter(got) == collections.Counter(want)
  vocab = make_vocabulary(corpus["tok"])
  assert any(p[0] == vocab.fim_begin_id for p in got)  # some documents became FIM examples
  assert any(p[0] != vocab.fim_begin_id for p in got)


def test_same_seed_same_batches_and_resume(corpus):
  a = _take(Pipeline(_cfg(corpus, seed=5)), 5)
  b = _take(Pipeline(_cfg(corpus, seed=5)), 5)
  c = _take(Pipeline(_cfg(corpus, seed=6)), 5)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert any(not np.array_equal(x["targets"], z["targets"]) for x, z in zip(a, c))
  first = Pipeline(_cfg(corpus, seed=5))
  _take(first, 3)
  resumed = Pipeline(_cfg(corpus, seed=5), start_batch=first.state()["batches"])
  assert resumed.state()["batches"] == 3  # a resumed pipeline reports its position at once
  for x, y in zip(a[3:], _take(resumed, 2)):
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_two_hosts_read_disjoint_shards_covering_the_split(corpus):
  cfg = _cfg(corpus, batch_size=1, task="code_python", shuffle=False)
  whole = collections.Counter(_segments(list(Pipeline(cfg, num_epochs=1))))
  parts = [collections.Counter(_segments(list(Pipeline(cfg, shard_index=i, num_shards=2,
                                                       num_epochs=1)))) for i in range(2)]
  assert parts[0] and parts[1]
  assert not set(parts[0]) & set(parts[1])
  assert parts[0] + parts[1] == whole


def test_long_document_upsampling(corpus):
  cfg = _cfg(corpus, batch_size=1, task="code_python", shuffle=False)
  plain = len(_segments(list(Pipeline(cfg, num_epochs=1))))
  more = _segments(list(Pipeline(DataConfig(**{**cfg.__dict__, "long_doc_min_tokens": 1000,
                                                "long_doc_factor": 3}), num_epochs=1)))
  assert len(more) > plain


def test_round_trip_over_the_embedded_corpus(corpus):
  tok = load_tokenizer(corpus["tok"])
  docs = list(iter_documents(default_sources(), BuildStats()))
  assert len(docs) > 500
  encs = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
  for d, e in zip(docs, encs):
    assert tok.decode(e.ids, skip_special_tokens=False) == d.text, d.key


def test_cli_build_and_show(corpus, tmp_path, capsys):
  assert cli.main(["build", "--source", str(corpus["src"]), "--out", str(tmp_path),
                   "--vocab_size", "600"]) == 0
  out = capsys.readouterr().out
  assert "unknown_extension" in out and "python" in out and "tokenizer.json" in out
  assert cli.main(["show", "--data_dir", str(tmp_path), "--seq_len", "512", "--num", "8",
                   "--fim_rate", "1.0", "--max_chars", "100000"]) == 0
  out = capsys.readouterr().out
  assert out.count("=== row") == 8 and "--- segment 1" in out
  assert "<｜fim▁begin｜>" in out and "<｜fim▁hole｜>" in out  # FIM markers visible
  assert cli.main(["build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["show", "--data_dir", str(tmp_path / "nothing")]) == 2
  assert "no built corpus" in capsys.readouterr().err


def test_bad_pipeline_arguments(corpus):
  with pytest.raises(ValueError, match="^seq_len"):
    _cfg(corpus, seq_len=0)
  with pytest.raises(ValueError, match="^shard_index"):
    Pipeline(_cfg(corpus), shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="^start_batch: must be >= 0"):
    Pipeline(_cfg(corpus), start_batch=-1)


def test_pack_keeps_every_token_in_order():
  from coder_jax.data.pipeline import pack
  rng = np.random.default_rng(0)
  pieces = [rng.integers(3, 100, n).astype(np.int32) for n in rng.integers(1, 9, 200)]
  rows = list(pack(iter(pieces), 8, bos_id=1))
  assert all(r["targets"].shape == (8,) for r in rows)
  flat = np.concatenate([r["targets"][r["segment_ids"] > 0] for r in rows])
  assert np.array_equal(flat, np.concatenate(pieces))
  # next-fit: a row is closed only when the next piece would not fit
  for r, nxt in zip(rows, rows[1:]):
    first_next = int((nxt["segment_ids"] == 1).sum())
    assert int((r["segment_ids"] > 0).sum()) + first_next > 8
  with pytest.raises(ValueError, match="^seq_len: a piece of 9 tokens exceeds 8"):
    list(pack(iter([np.zeros(9, np.int32)]), 8, bos_id=1))


def test_mixture_rates_default_to_tokens_and_can_be_set(corpus):
  import seqio
  import tensorflow_datasets as tfds
  from coder_jax.data.tasks import register_code_tasks
  vocab = make_vocabulary(corpus["tok"])
  builder = tfds.builder_from_directory(corpus["dataset_dir"])
  tokens = {}
  for split in builder.info.splits:
    if split.startswith("train_"):
      tokens[split[len("train_"):]] = sum(
          len(vocab.encode(ex["text"].decode())) for ex in
          builder.as_dataset(split=split).as_numpy_iterator())
  name = register_code_tasks(corpus["dataset_dir"], corpus["tok"])
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name[len("code_"):]: mixture.get_rate(t) for t in mixture.tasks}
  assert set(rates) == {"python", "c", "java"}
  for lang, n in tokens.items():  # small corpus: the sample is every document, so exact
    assert rates[lang] == pytest.approx(n, rel=1e-6)
  register_code_tasks(corpus["dataset_dir"], corpus["tok"], rates={"python": 1.0, "c": 3.0})
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "code_python": 1.0, "code_c": 3.0, "code_java": 0.0}


def test_last_partial_batch_is_padded_not_dropped(corpus):
  fim = FimConfig(rate=0.5, seed=4)
  batches = list(Pipeline(_cfg(corpus, batch_size=64, task="code_python", fim=fim), num_epochs=1))
  assert collections.Counter(_segments(batches)) == collections.Counter(
      _expected_pieces(corpus, "python", fim))
  last = batches[-1]
  assert not last["segment_ids"][-1].any() and not last["loss_weights"][-1].any()


def test_one_validation_pass_covers_every_language(corpus):
  fim = FimConfig(rate=0.5, seed=0)
  langs = sorted(corpus["stats"]["per_split_language"]["validation"])
  got = _segments(list(Pipeline(_cfg(corpus, split="validation", batch_size=3, fim=fim),
                                num_epochs=1)))
  want = [p for lang in langs for p in _expected_pieces(corpus, lang, fim, "validation")]
  assert collections.Counter(got) == collections.Counter(want)


def test_bad_rates_and_missing_splits_are_clear_errors(corpus):
  with pytest.raises(ValueError, match=r"^rates: \['Python'\] are not languages"):
    next(Pipeline(_cfg(corpus, rates=(("Python", 1.0),))))
  with pytest.raises(ValueError, match="^rates: no language has a positive rate"):
    next(Pipeline(_cfg(corpus, rates=(("python", 0.0),))))
  train_langs = set(corpus["stats"]["per_split_language"]["train"])
  missing = sorted(set(corpus["stats"]["per_language"]) - train_langs)
  if missing:
    with pytest.raises(ValueError, match=f"^split: code_{missing[0]} has no 'train' data"):
      next(Pipeline(_cfg(corpus, task=f"code_{missing[0]}")))


def test_close_stops_the_stream_and_next_continues_where_it_was(corpus):
  straight = _take(Pipeline(_cfg(corpus, seed=3)), 4)
  pipe = Pipeline(_cfg(corpus, seed=3))
  assert pipe.tokenizer_path == os.path.abspath(corpus["tok"])
  first = _take(pipe, 2)
  pipe.close()
  assert pipe._rows is None  # the tf.data iterator is gone
  for x, y in zip(straight, first + _take(pipe, 2)):
    assert all(np.array_equal(x[k], y[k]) for k in x)
