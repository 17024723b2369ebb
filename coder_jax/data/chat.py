"""Supervised fine-tuning data: chat JSONL rendered with the Instruct template, packed, with the
loss on the assistant's replies only. Pure python + numpy + tokenizers (no TensorFlow).

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
DeepSeek-Coder-V2-Instruct's template (the one `coder_jax.hf` exports) renders one turn as
  <｜begin▁of▁sentence｜>User: {q}\n\nAssistant: {a}<｜end▁of▁sentence｜>
with a system text as `{system}\n\n` and every further turn appended the same way.

What is trained: the text a sampler produces after the generation prompt. That prompt is
"...Assistant:" (the exported template's `add_generation_prompt`), so the trained span of a reply
is " {a}" plus its EOS; BOS, system and user text and the "Assistant:" prefix carry no loss. The
untrained text up to each reply is tokenized as one string, exactly as a sampler tokenizes its
prompt, and each reply separately, so every token is known to be the reply's or not. Every
assistant turn of a conversation is trained.

Rows: examples are packed first-fit (among the last `pack_window` open rows) into rows of seq_len
with segment ids counting from 1 (0 = padding) and positions restarting at 0. An example of n
tokens [BOS, ..., EOS] is a segment of n - 1 positions, inputs x[:-1] and targets x[1:], so no
target crosses into the next example. An example longer than that is skipped by default
(`overlong="skip"`: a cut reply would teach an answer without its end) or cut
(`overlong="truncate"`); both are counted.

Batches: the rows of all epochs form one sequence (epoch e shuffled by (seed, e)); batch b is global
rows [b * R, (b + 1) * R) with R = batch_rows * num_shards, of which host `shard` reads its own
batch_rows. The global batch is thus the same for any host count, and resuming at batch b only
replays the packing plan (lengths, no tokens). Malformed records are skipped and counted by reason
(`SKIP_REASONS`), summarised in one printed line when a stream opens.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
from typing import Iterator, Sequence

import gin
import numpy as np

from coder_jax.data.tokenizer import BOS, EOS, load_tokenizer, resolve_path

SKIP_REASONS = ("bad_json", "invalid_utf8", "no_messages", "bad_message", "unknown_role",
                "non_string_content", "no_assistant_turn", "empty_reply", "too_long")
ROLES = ("system", "user", "assistant")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How each role renders; `{content}` marks the message text. BOS opens a conversation and EOS
  closes each reply; only `assistant` (and its EOS) is trained, `assistant_prefix` is not."""
  system: str = "{content}\n\n"
  user: str = "User: {content}\n\n"
  assistant_prefix: str = "Assistant:"
  assistant: str = " {content}"

  def __post_init__(self):
    for name in ("system", "user", "assistant"):
      if getattr(self, name).count("{content}") != 1:
        raise ValueError(f"ChatTemplate.{name}: must hold '{{content}}' once, got "
                         f"{getattr(self, name)!r}")

  def runs(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The conversation after BOS as (text, trained) runs; each trained run is followed by EOS.
    Adjacent untrained texts are joined, so a prompt is one string as a sampler would see it."""
    out: list[tuple[str, bool]] = []
    for m in messages:
      role, text = m["role"], m["content"]
      if role == "assistant":
        pieces = [(self.assistant_prefix, False), (self.assistant.replace("{content}", text), True)]
      else:
        pieces = [(getattr(self, role).replace("{content}", text), False)]
      for piece, trained in pieces:
        if not trained and out and not out[-1][1]:
          out[-1] = (out[-1][0] + piece, False)
        else:
          out.append((piece, trained))
    return out

  def render(self, messages: Sequence[dict]) -> str:
    """The conversation as text, special tokens spelled out."""
    return BOS + "".join(t + (EOS if trained else "") for t, trained in self.runs(messages))


def parse_record(line: bytes | str) -> tuple[list[dict] | None, str | None]:
  """(messages, None) for a usable record, else (None, the reason it is skipped)."""
  try:
    rec = json.loads(line)
  except UnicodeDecodeError:
    return None, "invalid_utf8"
  except (ValueError, RecursionError):
    return None, "bad_json"
  msgs = rec.get("messages") if isinstance(rec, dict) else None
  if not isinstance(msgs, list) or not msgs:
    return None, "no_messages"
  for m in msgs:
    if not isinstance(m, dict):
      return None, "bad_message"
    if m.get("role") not in ROLES:
      return None, "unknown_role"
    if not isinstance(m.get("content"), str):
      return None, "non_string_content"
    try:
      m["content"].encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell lone surrogates that no tokenizer takes
      return None, "invalid_utf8"
  replies = [m["content"] for m in msgs if m["role"] == "assistant"]
  if not replies:
    return None, "no_assistant_turn"
  if any(not r.strip() for r in replies):
    return None, "empty_reply"
  return [{"role": m["role"], "content": m["content"]} for m in msgs], None


@dataclasses.dataclass
class ChatExamples:
  """Tokenized examples, flat: example i is tokens[offsets[i]:offsets[i + 1]] ([BOS, ..., EOS],
  at most seq_len + 1 tokens); `trained` marks the tokens that are trained targets."""
  path: str
  tokens: np.ndarray
  trained: np.ndarray
  offsets: np.ndarray
  records: int = 0
  truncated: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = self.offsets[i], self.offsets[i + 1]
    return self.tokens[a:b], self.trained[a:b]

  def summary(self) -> str:
    """One line: records read, examples kept and their tokens, truncations, skips by reason."""
    skipped = sorted(((n, r) for r, n in self.skipped.items() if n), key=lambda x: (-x[0], x[1]))
    why = ", ".join(f"{r} {n:,}" for n, r in skipped)
    return (f"chat data {self.path}: {self.records:,} records -> {len(self):,} examples "
            f"({len(self.tokens):,} tokens, {int(self.trained.sum()):,} trained), "
            f"{self.truncated:,} truncated; skipped {sum(self.skipped.values()):,}"
            + (f" ({why})" if why else ""))


def read_lines(path: str) -> Iterator[bytes]:
  """The raw lines of a JSONL file (gzip when it ends in .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as fh:
    yield from fh


def encode_runs(tok, convs: list, chunk: int = 2048) -> Iterator[tuple[list, list[list[int]]]]:
  """(runs, token ids of each run) per conversation. Batched calls let the Rust side work in
  parallel; chunks bound the memory its Encoding objects take (~100 bytes a token)."""
  for at in range(0, len(convs), chunk):
    part = convs[at:at + chunk]
    encs = iter(tok.encode_batch([t for runs in part for t, _ in runs], add_special_tokens=False))
    for runs in part:
      yield runs, [next(encs).ids for _ in runs]


def load_examples(path: str, tokenizer: str, template: ChatTemplate, seq_len: int,
                  overlong: str = "skip") -> ChatExamples:
  """Reads, validates, renders and tokenizes every record of a chat JSONL (.gz allowed)."""
  if overlong not in ("skip", "truncate"):
    raise ValueError(f"overlong: 'skip' or 'truncate', got {overlong!r}")
  tok = load_tokenizer(tokenizer)
  tok.encode_special_tokens = True  # a literal EOS spelled in a message stays text
  bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
  path = os.path.abspath(path)
  skipped: collections.Counter = collections.Counter()
  records, convs = 0, []
  for line in read_lines(path):
    if not line.strip():
      continue
    records += 1
    msgs, reason = parse_record(line)
    if reason:
      skipped[reason] += 1
    else:
      convs.append(template.runs(msgs))
  tokens, trained, lengths, truncated = [], [], [], 0
  for runs, piece_ids in encode_runs(tok, convs):
    ids, marks = [bos], [False]
    for (_, is_trained), piece in zip(runs, piece_ids):
      ids += piece + ([eos] if is_trained else [])
      marks += [is_trained] * (len(piece) + is_trained)
    if len(ids) > seq_len + 1:
      if overlong == "skip" or not any(marks[1:seq_len + 1]):
        skipped["too_long"] += 1
        continue
      ids, marks = ids[:seq_len + 1], marks[:seq_len + 1]
      truncated += 1
    tokens.append(np.asarray(ids, np.int32))
    trained.append(np.asarray(marks, bool))
    lengths.append(len(ids))
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
  cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
  return ChatExamples(path, cat(tokens, np.int32), cat(trained, bool), offsets, records,
                      truncated, skipped)


def first_fit(order: Sequence[int], sizes: Sequence[int], capacity: int,
              window: int) -> Iterator[list[int]]:
  """Rows of item ids: each item goes to the first of the open rows it fits in, else a new row;
  beyond `window` open rows the oldest is emitted (bounded work per item, rows stay in order)."""
  rows: list[list] = []  # [free space, ids]
  for i in order:
    n = sizes[i]
    for row in rows:
      if row[0] >= n:
        row[0] -= n
        row[1].append(i)
        break
    else:
      rows.append([capacity - n, [i]])
      if len(rows) > window:
        yield rows.pop(0)[1]
  for row in rows:
    yield row[1]


def row_plan(num_examples: int, sizes: Sequence[int], seq_len: int, *, seed: int, shuffle: bool,
             epochs: int | None, window: int) -> Iterator[list[int]]:
  """Global rows (lists of example ids) of every epoch in order; a pure function of its args."""
  epoch = 0
  while epochs is None or epoch < epochs:
    order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
             else np.arange(num_examples)).tolist()
    yield from first_fit(order, sizes, seq_len, window)
    epoch += 1


class ChatStream:
  """This host's rows of each global batch; `state()` is the batch count to resume from."""

  def __init__(self, examples: ChatExamples, *, tokenizer_path: str, seq_len: int,
               batch_rows: int, shard: int, num_shards: int, start_batch: int, seed: int,
               shuffle: bool, epochs: int | None, window: int):
    self.examples, self.tokenizer_path, self.seq_len = examples, tokenizer_path, seq_len
    self.batch_rows, self.shard, self.num_shards = batch_rows, shard, num_shards
    self.epochs, self.batches = epochs, 0
    sizes = (np.diff(examples.offsets) - 1).tolist()  # positions each example takes in a row
    self._rows = row_plan(len(examples), sizes, seq_len, seed=seed, shuffle=shuffle,
                          epochs=epochs, window=window)
    try:
      for _ in range(start_batch):
        self._global_rows()
        self.batches += 1
    except StopIteration as e:
      raise ValueError(f"start_batch: {start_batch} is past the end: {e}") from None

  @property
  def skipped(self) -> collections.Counter:
    return self.examples.skipped

  @property
  def truncated(self) -> int:
    return self.examples.truncated

  def _global_rows(self) -> list[list[int]]:
    """The next batch's global rows; [] for padding rows once the last epoch is spent."""
    rows = [next(self._rows, []) for _ in range(self.batch_rows * self.num_shards)]
    if not any(rows):
      raise StopIteration(f"chat data: all {self.epochs} epoch(s) used after {self.batches} "
                          f"batches; set ChatData.epochs = None to repeat without end")
    return rows

  def _row(self, ids: list[int]) -> dict:
    out = {k: np.zeros(self.seq_len, np.int32) for k in BATCH_KEYS}
    at = 0
    for seg, i in enumerate(ids, 1):
      x, w = self.examples.example(i)
      n = len(x) - 1
      out["inputs"][at:at + n] = x[:-1]
      out["targets"][at:at + n] = x[1:]
      out["loss_weights"][at:at + n] = w[1:]
      out["segment_ids"][at:at + n] = seg
      out["positions"][at:at + n] = np.arange(n)
      at += n
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = self._global_rows()
    mine = rows[self.shard * self.batch_rows:(self.shard + 1) * self.batch_rows]
    self.batches += 1
    built = [self._row(ids) for ids in mine]
    return {k: np.stack([r[k] for r in built]) for k in BATCH_KEYS}

  def state(self) -> dict:
    return {"batches": self.batches}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChatData:
  """SFT batches from a chat JSONL (see the module docstring); `open` is the loop's protocol."""
  path: str = gin.REQUIRED
  tokenizer: str = gin.REQUIRED      # tokenizer.json, or a directory holding one
  template: ChatTemplate | None = None   # None: ChatTemplate() as gin binds it (Instruct's)
  seed: int = 0
  shuffle: bool = True
  epochs: int | None = None          # None: repeat, reshuffled each epoch, for as long as asked
  overlong: str = "skip"             # or "truncate": keep the first seq_len positions
  pack_window: int = 64              # open rows first-fit searches

  def __post_init__(self):
    if self.epochs is not None and self.epochs < 1:
      raise ValueError(f"ChatData.epochs: None or >= 1, got {self.epochs}")
    if self.pack_window < 1:
      raise ValueError(f"ChatData.pack_window: must be >= 1, got {self.pack_window}")

  def load(self, seq_len: int) -> ChatExamples:
    return load_examples(self.path, self.tokenizer, self.template or ChatTemplate(), seq_len,
                         self.overlong)

  def open(self, *, model_vocab: int, batch_rows: int, seq_len: int, shard: int, num_shards: int,
           start_batch: int) -> ChatStream:
    tok_path = os.path.abspath(resolve_path(self.tokenizer))
    n = load_tokenizer(tok_path).get_vocab_size(with_added_tokens=True)
    if n > model_vocab:
      raise ValueError(f"vocab_size: the tokenizer {tok_path} has {n} tokens but the model's "
                       f"vocab_size is {model_vocab}; set model_config.vocab_size >= {n} or use "
                       "the tokenizer the model was trained with")
    examples = self.load(seq_len)
    if shard == 0:
      print(examples.summary(), flush=True)
    if not len(examples):
      raise ValueError(f"ChatData.path: no usable examples in {examples.path} "
                       f"({examples.summary()})")
    return ChatStream(examples, tokenizer_path=tok_path, seq_len=seq_len, batch_rows=batch_rows,
                      shard=shard, num_shards=num_shards, start_batch=start_batch,
                      seed=self.seed, shuffle=self.shuffle, epochs=self.epochs,
                      window=self.pack_window)
