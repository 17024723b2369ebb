"""SFT data (coder_jax.data.chat): the Instruct template, loss on assistant tokens only, packing,
resume and malformed records, on a tokenizer trained here."""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest

from coder_jax.data.chat import ChatData, ChatTemplate
from coder_jax.data.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer

SEQ = 96


def _conversations():
  """ASCII conversations: one turn, with a system text, multi-turn, and a user text that spells
  the EOS token (which must stay text)."""
  rng = np.random.default_rng(0)
  words = ["def", "return", "list", "sort", "value", "index", "print", "loop", "x", "y", "+", "1"]
  say = lambda n: " ".join(rng.choice(words, n).tolist())
  convs = []
  for i in range(24):
    turns = 1 + i % 3
    msgs = [{"role": "system", "content": f"You are coder {i}."}] if i % 4 == 0 else []
    for t in range(turns):
      msgs += [{"role": "user", "content": f"task {i}.{t}: " + say(2 + (i * 3 + t) % 5)},
               {"role": "assistant", "content": say(1 + (i + t * 5) % 7)}]
    convs.append(msgs)
  convs[5][0]["content"] = f"what does {EOS} mean?"
  return convs


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  convs = _conversations()
  texts = [m["content"] for c in convs for m in c] + ["User: Assistant: \n\n"] * 4
  tok_path = str(root / "tokenizer.json")
  train_tokenizer(texts, 400, tok_path)
  data = _write(root / "chat.jsonl", [{"messages": c} for c in convs])
  # Decoding one token at a time needs whole characters: leave out the user text spelling EOS.
  ascii_data = _write(root / "ascii.jsonl", [{"messages": c} for c in convs if EOS not in str(c)])
  tok = load_tokenizer(tok_path)
  vocab = tok.get_vocab_size(with_added_tokens=True)
  return dict(root=root, convs=convs, tok_path=tok_path, data=data, ascii_data=ascii_data,
              tok=tok, vocab=vocab,
              by_text={ChatTemplate().render(c): c for c in convs})


def _open(env, path=None, *, batch_rows=2, seq_len=SEQ, shard=0, num_shards=1, start_batch=0,
          **kw):
  data = ChatData(path=path or env["data"], tokenizer=env["tok_path"], **kw)
  return data.open(model_vocab=512, batch_rows=batch_rows, seq_len=seq_len, shard=shard,
                   num_shards=num_shards, start_batch=start_batch)


def _segments(batch):
  """(row, segment indices) of every packed example of a batch."""
  for r in range(batch["segment_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      yield r, np.flatnonzero(seg == s)


def _decode(tok, ids):
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _segment_ids(batch, r, idx):
  """The example's tokens: BOS (its first input) then its targets."""
  return np.concatenate([batch["inputs"][r, idx[:1]], batch["targets"][r, idx]])


def test_one_turn_renders_the_instruct_template(env, tmp_path):
  q, a = "write fib", "def fib(n): return n"
  one = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  assert ChatTemplate().render(one) == f"{BOS}User: {q}\n\nAssistant: {a}{EOS}"
  sys_ = [{"role": "system", "content": "Be brief."}] + one
  assert ChatTemplate().render(sys_) == f"{BOS}Be brief.\n\nUser: {q}\n\nAssistant: {a}{EOS}"
  # The tokens the stream trains on spell exactly that text.
  batch = next(_open(env, _write(tmp_path / "one.jsonl", [{"messages": one}]), batch_rows=1))
  [(r, idx)] = list(_segments(batch))
  assert _decode(env["tok"], _segment_ids(batch, r, idx)) == ChatTemplate().render(one)


def _weighted_runs(w):
  """[start, end) of each run of consecutive ones."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], w, [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_loss_weights_mark_exactly_the_assistant_tokens(env):
  tok, eos = env["tok"], env["tok"].token_to_id(EOS)
  stream, seen = _open(env, epochs=1, shuffle=False), 0
  for batch in stream:
    assert not batch["loss_weights"][batch["segment_ids"] == 0].any()
    for r, idx in _segments(batch):
      ids = _segment_ids(batch, r, idx)
      conv = env["by_text"][_decode(tok, ids)]
      replies = [m["content"] for m in conv if m["role"] == "assistant"]
      w, tgt = batch["loss_weights"][r, idx], batch["targets"][r, idx]
      # Each reply is one run of weighted targets: " " + its text + EOS, and nothing else is.
      runs = _weighted_runs(w)
      assert [_decode(tok, tgt[a:b]) for a, b in runs] == [f" {x}{EOS}" for x in replies]
      assert all(tgt[b - 1] == eos for _, b in runs)
      # EOS ids only close replies: the user text spelling EOS stayed text.
      assert int((ids == eos).sum()) == len(replies)
      seen += 1
  assert seen == len(env["convs"])


def test_sft_loss_is_the_loss_on_assistant_tokens(env):
  from coder_jax.model import get_config, init_model
  from coder_jax.train.step import lm_objective
  tok = env["tok"]
  cfg = get_config("tiny", vocab_size=env["vocab"], dtype="float32")
  model = init_model(cfg, seed=0)
  batch = next(_open(env, env["ascii_data"], seed=1))
  objective = lm_objective(cfg)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  _, metrics = objective.loss_fn(model, jbatch, objective.norms(jbatch))
  # Oracle: each example alone in its own row; a target is trained when its characters lie in
  # " " + reply + EOS after "Assistant:" of the rendered conversation.
  examples = list(_segments(batch))
  assert len(examples) > batch["inputs"].shape[0]  # rows really hold several examples
  rows, targets, masks = np.zeros((len(examples), SEQ), np.int32), [], []
  for e, (r, idx) in enumerate(examples):
    ids = _segment_ids(batch, r, idx)
    pieces = [_decode(tok, [i]) for i in ids]
    text = "".join(pieces)
    spans, cursor = [], 0
    for m in env["by_text"][text]:
      if m["role"] == "assistant":
        start = text.index(f"Assistant: {m['content']}{EOS}", cursor) + len("Assistant:")
        cursor = start + len(f" {m['content']}{EOS}")
        spans.append((start, cursor))
    ends = np.cumsum([len(p) for p in pieces])
    # Target j is token j + 1, whose characters are [ends[j], ends[j + 1]).
    mask = np.array([any(a <= ends[j] and ends[j + 1] <= b for a, b in spans)
                     for j in range(len(ids) - 1)])
    np.testing.assert_array_equal(mask, batch["loss_weights"][r, idx].astype(bool))
    rows[e, :len(idx)] = ids[:-1]
    targets.append(ids[1:])
    masks.append(mask)
  seg = np.stack([(np.arange(SEQ) < len(t)).astype(np.int32) for t in targets])
  pos = np.tile(np.arange(SEQ, dtype=np.int32), (len(examples), 1))
  logits = np.asarray(model(jnp.asarray(rows), jnp.asarray(seg), jnp.asarray(pos)), np.float64)
  nll, nll_all = [], []
  for e, (t, m) in enumerate(zip(targets, masks)):
    lp = logits[e, :len(t)]
    lp = lp - lp.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    tok_nll = -lp[np.arange(len(t)), t]
    nll += tok_nll[m].tolist()
    nll_all += tok_nll.tolist()
  want = np.mean(nll)
  np.testing.assert_allclose(float(metrics["ce_loss"]), want, rtol=1e-6)
  # Weights on every token would miss by far more than the tolerance.
  assert abs(np.mean(nll_all) - want) > 100 * 1e-6 * want


def test_packing_keeps_documents_separate_and_covers_one_epoch(env):
  tok = env["tok"]
  stream = _open(env, epochs=1, batch_rows=3, seed=7)
  bos = tok.token_to_id(BOS)
  seen, batches = collections.Counter(), 0
  for batch in stream:
    batches += 1
    for r in range(3):
      seg = batch["segment_ids"][r]
      used = int((seg > 0).sum())
      assert not seg[used:].any() and not batch["targets"][r, used:].any()
      for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
        assert np.array_equal(batch["positions"][r, idx], np.arange(len(idx)))
        assert batch["inputs"][r, idx[0]] == bos
        assert np.array_equal(batch["inputs"][r, idx[1:]], batch["targets"][r, idx[:-1]])
        seen[_decode(tok, _segment_ids(batch, r, idx))] += 1
  assert seen == collections.Counter(list(env["by_text"]))  # each example once, none cut or merged
  assert stream.state() == {"batches": batches}
  with pytest.raises(StopIteration, match="epoch"):
    next(stream)
  assert batches * 3 < 2 * len(seen)  # first-fit put 1.5+ examples in a row on average


def _take(stream, n):
  return [next(stream) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_continues_exactly_and_reshuffles_each_epoch(env):
  fresh = _take(_open(env, seed=3, batch_rows=2), 12)  # 24 examples: several epochs in 12
  again = _take(_open(env, seed=3, batch_rows=2), 12)
  assert all(_equal(a, b) for a, b in zip(fresh, again))
  for k in (1, 5, 9):
    resumed = _open(env, seed=3, batch_rows=2, start_batch=k)
    assert resumed.state() == {"batches": k}
    assert all(_equal(a, b) for a, b in zip(_take(resumed, 3), fresh[k:k + 3]))
  # Two hosts read the two halves of the same global batch.
  halves = [_take(_open(env, seed=3, batch_rows=1, shard=s, num_shards=2, start_batch=4), 2)
            for s in (0, 1)]
  for b, (h0, h1) in enumerate(zip(*halves)):
    assert all(np.array_equal(fresh[4 + b][k], np.concatenate([h0[k], h1[k]])) for k in h0)
  order = [_decode(env["tok"], _segment_ids(b, r, idx))
           for b in _open(env, seed=3, epochs=2, batch_rows=1) for r, idx in _segments(b)]
  assert len(order) == 48
  assert sorted(order[:24]) == sorted(order[24:]) and order[:24] != order[24:]


def test_malformed_records_are_skipped_and_counted(env, tmp_path, capsys):
  good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps(good).encode(), b"{not json", b'{"messages": "\xff"}', b"",
           b'{"messages": []}', b'{"text": "hi"}', b"[1, 2]", b'{"messages": ["hi"]}',
           json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "  \n"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "q " * 200},
                                    {"role": "assistant", "content": "a"}]}).encode(),
           b'{"messages": [{"role": "user", "content": "\\ud800"}, '
           b'{"role": "assistant", "content": "a"}]}',
           json.dumps(good).encode()]
  path.write_bytes(b"\n".join(lines) + b"\n")
  stream = _open(env, str(path), epochs=1, batch_rows=2)
  assert stream.skipped == collections.Counter(
      bad_json=1, invalid_utf8=2, no_messages=3, bad_message=1, unknown_role=1,
      non_string_content=1, no_assistant_turn=1, empty_reply=1, too_long=1)
  out = capsys.readouterr().out
  assert "14 records -> 2 examples" in out and "skipped 12 (no_messages 3, invalid_utf8 2," in out
  batch = next(stream)
  assert batch["segment_ids"].max(axis=1).tolist() == [2, 0]  # both good copies, one row
  with pytest.raises(ValueError, match="no usable examples"):
    _open(env, _write(tmp_path / "none.jsonl", [{"messages": []}]))


def test_overlong_examples_truncate_when_asked(env, tmp_path):
  long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "sort " * 60}]
  path = _write(tmp_path / "long.jsonl", [{"messages": long}])
  stream = _open(env, path, overlong="truncate", batch_rows=1, seq_len=32)
  assert stream.truncated == 1 and not stream.skipped
  batch = next(stream)
  assert (batch["segment_ids"][0] == 1).all()  # the first 32 positions, trained after the prompt
  assert _decode(env["tok"], _segment_ids(batch, 0, np.arange(32))).startswith(
      f"{BOS}User: q\n\nAssistant: sort sort")
  w = batch["loss_weights"][0]
  assert w[-1] == 1 and w[0] == 0 and len(_weighted_runs(w)) == 1
  with pytest.raises(ValueError, match="no usable examples"):
    _open(env, path, batch_rows=1, seq_len=32)  # skip is the default


def test_configurable_template(env, tmp_path):
  tmpl = ChatTemplate(user="### Instruction:\n{content}\n", assistant_prefix="### Response:\n",
                      assistant="{content}")
  one = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "x + y"}]
  assert tmpl.render(one) == f"{BOS}### Instruction:\nadd\n### Response:\nx + y{EOS}"
  batch = next(_open(env, _write(tmp_path / "t.jsonl", [{"messages": one}]), template=tmpl,
                     batch_rows=1))
  w, tgt = batch["loss_weights"][0], batch["targets"][0]
  assert _decode(env["tok"], tgt[w == 1]) == f"x + y{EOS}"
  with pytest.raises(ValueError, match="ChatTemplate.user"):
    ChatTemplate(user="User: ")


def test_tokenizer_larger_than_model_vocab(env):
  data = ChatData(path=env["data"], tokenizer=env["tok_path"])
  with pytest.raises(ValueError, match=f"has {env['vocab']} tokens.*vocab_size is 300"):
    data.open(model_vocab=300, batch_rows=1, seq_len=SEQ, shard=0, num_shards=1, start_batch=0)


def test_cli_shows_rows_with_the_trained_runs_marked(env, tmp_path, capsys):
  from coder_jax.data import chat_cli
  one = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "x + y"}]
  path = _write(tmp_path / "c.jsonl", [{"messages": one}, {"messages": []}])
  assert chat_cli.main(["--data", path, "--tokenizer", env["tok_path"], "--seq_len", "64"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert "2 records -> 1 examples" in out[0] and "skipped 1 (no_messages 1)" in out[0]
  enc = lambda t: len(env["tok"].encode(t, add_special_tokens=False).ids)
  prompt, reply = enc("User: add\n\nAssistant:"), enc(" x + y") + 1  # + BOS / + EOS
  assert out[1:] == [f"=== {prompt + reply}/64 positions used, 1 examples, {reply} trained",
                     f"--- example 1 ({prompt + reply} positions)",
                     f'  prompt  "{BOS}User: add\\n\\nAssistant:"',
                     f'  TRAINED " x + y{EOS}"']
  assert chat_cli.main(["--data", str(tmp_path / "missing.jsonl"),
                        "--tokenizer", env["tok_path"]]) == 2


def test_gin_binds_the_template(env, tmp_path):
  import gin
  one = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "x + y"}]
  path = _write(tmp_path / "g.jsonl", [{"messages": one}])
  gin.clear_config()
  gin.parse_config(["ChatTemplate.user = 'Q: {content}\\n'", "ChatTemplate.assistant_prefix = 'A:'",
                    f"ChatData.path = '{path}'", f"ChatData.tokenizer = '{env['tok_path']}'"])
  try:
    batch = next(ChatData().open(model_vocab=512, batch_rows=1, seq_len=SEQ, shard=0,
                                 num_shards=1, start_batch=0))
  finally:
    gin.clear_config()
  [(r, idx)] = list(_segments(batch))
  assert _decode(env["tok"], _segment_ids(batch, r, idx)) == f"{BOS}Q: add\nA: x + y{EOS}"


def test_tokenizing_in_chunks_changes_nothing(env):
  from coder_jax.data.chat import encode_runs
  runs = [ChatTemplate().runs(c) for c in env["convs"]]
  assert list(encode_runs(env["tok"], runs, chunk=5)) == list(encode_runs(env["tok"], runs))
