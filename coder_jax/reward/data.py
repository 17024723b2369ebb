"""Reward-model data: JSONL records of (prompt, response) judged by the tests, rendered and
tokenized exactly as the Scorer scores them. Pure python + numpy + tokenizers (no jax).

Records, one JSON object a line (.gz allowed; other keys are ignored):
  pointwise  {"prompt": str, "response": str, "passed": true|false|1|0}
  pairwise   {"prompt": str, "chosen": str, "rejected": str}
`prompt` is the user's text (a problem's signature and docstring), `response` the assistant's
reply content (the function body); both are rendered with the SFT chat template
(`encode_pairs`: BOS, "User: {prompt}\\n\\nAssistant:", " {response}", EOS), the tokens a policy
conditions on and samples, so the RM scores what GRPO will show it.

Rows hold one sequence each, right padded to seq_len (segment id 0 = padding); a longer one is
skipped and counted. Pointwise rows carry `labels` (1 passed, 0 failed) and `row_weights`;
pairwise rows hold a pair as chosen_* and rejected_* (train/reward_losses.py's batch keys).

Held-out split: a record is held out when the hash of its prompt falls below heldout_fraction,
so every sample of a prompt lands on the same side (the held-out metrics then measure prompts the
RM has not seen) and the split does not depend on the seed, the file order or the host count.

Batches: the training examples of all epochs form one sequence (epoch e shuffled by (seed, e));
batch b is global rows [b * R, (b + 1) * R) with R = batch_rows * num_shards, of which host
`shard` reads its own batch_rows, so resuming at batch b is arithmetic, not a replay.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import gin
import numpy as np

from coder_jax.data.chat import ChatTemplate, encode_runs, read_lines
from coder_jax.data.tokenizer import BOS, EOS, load_tokenizer, resolve_path

OBJECTIVES = ("pointwise", "pairwise")
TEXT_FIELDS = {"pointwise": ("prompt", "response"), "pairwise": ("prompt", "chosen", "rejected")}
SKIP_REASONS = (
  "invalid_utf8",      # the line, or a text in it, is not valid UTF-8 (a lone surrogate)
  "bad_json",          # the line is not JSON
  "not_an_object",     # JSON, but not an object
  "other_objective",   # a pairwise record in a pointwise file, or the other way round
  "missing_field",     # a field of the objective is absent
  "non_string_text",   # prompt / response / chosen / rejected is not a string
  "bad_label",         # passed is not true, false, 1 or 0
  "identical_pair",    # chosen == rejected: nothing to prefer
  "too_long",          # the rendered sequence (either side of a pair) exceeds seq_len
)


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 template: ChatTemplate = ChatTemplate()) -> list[list[int]]:
  """Token ids of each rendered (prompt, response): [BOS, prompt ... "Assistant:",
  " response", EOS], tokenized as the SFT data is (coder_jax.data.chat): the text up to the
  reply as one string, the reply as another, a literal special token inside a text kept as
  text. The Scorer and the RM data both encode with this."""
  if len(prompts) != len(responses):
    raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in "
                     "length")
  tokenizer.encode_special_tokens = True
  bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
  convs = [template.runs([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
           for p, r in zip(prompts, responses)]
  out = []
  for runs, pieces in encode_runs(tokenizer, convs):
    ids = [bos]
    for (_, trained), piece in zip(runs, pieces):
      ids += piece + ([eos] if trained else [])
    out.append(ids)
  return out


def generation_prompt(prompt: str, template: ChatTemplate = ChatTemplate()) -> str:
  """The text a policy continues to answer `prompt` (after BOS): "User: {prompt}\\n\\nAssistant:"
  with the default template."""
  return template.runs([{"role": "user", "content": prompt},
                        {"role": "assistant", "content": ""}])[0][0]


def reply_content(reply: str, template: ChatTemplate = ChatTemplate()) -> str:
  """The content of a sampled reply: without the template's text around it (the default
  template's one leading space), so that encode_pairs renders the reply as it was sampled."""
  head, tail = template.assistant.split("{content}")
  if head and reply.startswith(head):
    reply = reply[len(head):]
  if tail and reply.endswith(tail):
    reply = reply[:-len(tail)]
  return reply


def prompt_is_heldout(prompt: str, fraction: float) -> bool:
  """Whether `prompt` belongs to the held-out split (a hash of its text, stable everywhere)."""
  h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
  return h < fraction * 2.0**64


def parse_record(line: bytes | str, objective: str) -> tuple[tuple | None, str | None]:
  """(fields, None) for a usable record, else (None, its SKIP_REASONS entry); fields are
  (prompt, response, 0.0 | 1.0) pointwise, (prompt, chosen, rejected) pairwise."""
  try:
    rec = json.loads(line)
  except UnicodeDecodeError:
    return None, "invalid_utf8"
  except (ValueError, RecursionError):   # deep nesting raises RecursionError
    return None, "bad_json"
  if not isinstance(rec, dict):
    return None, "not_an_object"
  fields = TEXT_FIELDS[objective]
  other = TEXT_FIELDS["pairwise" if objective == "pointwise" else "pointwise"]
  if not all(k in rec for k in fields):
    mine = set(fields[1:]) & set(rec)
    return None, ("other_objective" if not mine and all(k in rec for k in other[1:])
                  else "missing_field")
  texts = [rec[k] for k in fields]
  if not all(isinstance(t, str) for t in texts):
    return None, "non_string_text"
  try:
    for t in texts:
      t.encode("utf-8")
  except UnicodeEncodeError:   # JSON can spell lone surrogates that no tokenizer takes
    return None, "invalid_utf8"
  if objective == "pairwise":
    return (None, "identical_pair") if texts[1] == texts[2] else (tuple(texts), None)
  if "passed" not in rec:
    return None, "missing_field"
  passed = rec["passed"]
  # true / false or 1 / 0 (Python's True == 1), not 1.0, "true" or 2.
  if isinstance(passed, float) or passed not in (True, False):
    return None, "bad_label"
  return (*texts, float(passed)), None


@dataclasses.dataclass
class RewardExamples:
  """Tokenized examples, flat: sequence j is tokens[offsets[j]:offsets[j + 1]]; example i is
  sequence i (pointwise) or the pair 2i (chosen), 2i + 1 (rejected)."""
  path: str
  objective: str
  tokenizer_path: str
  tokenizer_size: int
  seq_len: int
  tokens: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray | None      # float32 [n], pointwise only
  heldout: np.ndarray            # bool [n]
  prompts: tuple[int, int] = (0, 0)   # distinct prompts (train, held out)
  records: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  seed: int = 0
  shuffle: bool = True

  @property
  def sides(self) -> int:
    return 2 if self.objective == "pairwise" else 1

  def __len__(self) -> int:
    return len(self.heldout)

  def sequence(self, j: int) -> np.ndarray:
    return self.tokens[self.offsets[j]:self.offsets[j + 1]]

  def summary(self) -> str:
    """One line: records, examples by split (and by label), skips by reason."""
    n_held = int(self.heldout.sum())
    label = ""
    if self.labels is not None:
      passed = int(self.labels.sum())
      label = f", {passed:,} passed / {len(self) - passed:,} failed"
    skipped = sorted(((n, r) for r, n in self.skipped.items() if n), key=lambda x: (-x[0], x[1]))
    why = ", ".join(f"{r} {n:,}" for n, r in skipped)
    return (f"reward data {self.path} ({self.objective}): {self.records:,} records -> "
            f"{len(self):,} examples ({len(self) - n_held:,} train / {n_held:,} held out; "
            f"{self.prompts[0]:,} / {self.prompts[1]:,} prompts{label}); skipped "
            f"{sum(self.skipped.values()):,}" + (f" ({why})" if why else ""))

  def check_vocab(self, model_vocab: int):
    if self.tokenizer_size > model_vocab:
      raise ValueError(f"vocab_size: the tokenizer {self.tokenizer_path} has "
                       f"{self.tokenizer_size} tokens but the model's vocab_size is "
                       f"{model_vocab}; it is not this model's tokenizer (use the policy's "
                       "tokenizer.json)")

  def rows(self, examples: Sequence[int], num_rows: int | None = None) -> dict:
    """The batch of `examples` (global indices), padded with empty rows (weight 0) to
    num_rows."""
    num_rows = len(examples) if num_rows is None else num_rows
    t = self.seq_len
    prefixes = ("",) if self.sides == 1 else ("chosen_", "rejected_")
    out = {f"{p}{k}": np.zeros((num_rows, t), np.int32) for p in prefixes
           for k in ("inputs", "segment_ids", "positions")}
    out["row_weights"] = np.zeros(num_rows, np.float32)
    if self.labels is not None:
      out["labels"] = np.zeros(num_rows, np.float32)
    for r, i in enumerate(examples):
      for side, p in enumerate(prefixes):
        x = self.sequence(i * self.sides + side)
        out[f"{p}inputs"][r, :len(x)] = x
        out[f"{p}segment_ids"][r, :len(x)] = 1
        out[f"{p}positions"][r, :len(x)] = np.arange(len(x))
      out["row_weights"][r] = 1.0
      if self.labels is not None:
        out["labels"][r] = self.labels[i]
    return out

  def heldout_batch(self) -> dict:
    """Every held-out example as one batch of arrays (evaluation)."""
    return self.rows(np.flatnonzero(self.heldout).tolist())

  def open(self, *, model_vocab: int, batch_rows: int, seq_len: int, shard: int,
           num_shards: int, start_batch: int) -> "RewardStream":
    """The loop's stream protocol over the training split (coder_jax/train/loop.py)."""
    if seq_len != self.seq_len:
      raise ValueError(f"seq_len: the examples were loaded for {self.seq_len}, not {seq_len}")
    self.check_vocab(model_vocab)
    return RewardStream(self, batch_rows=batch_rows, shard=shard, num_shards=num_shards,
                        start_batch=start_batch)


class RewardStream:
  """This host's rows of each global batch of training examples; `state()` is the batch count."""

  def __init__(self, examples: RewardExamples, *, batch_rows: int, shard: int, num_shards: int,
               start_batch: int):
    self.examples, self.tokenizer_path = examples, examples.tokenizer_path
    self.batch_rows, self.shard, self.num_shards = batch_rows, shard, num_shards
    self.batches = start_batch
    self.train = np.flatnonzero(~examples.heldout)
    self._orders: dict[int, np.ndarray] = {}

  @property
  def skipped(self) -> collections.Counter:
    return self.examples.skipped

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:   # rows only move forward; a batch may straddle two epochs
      self._orders = {k: v for k, v in self._orders.items() if k == epoch - 1}
      n, e = len(self.train), self.examples
      self._orders[epoch] = (np.random.default_rng([e.seed, epoch]).permutation(n)
                             if e.shuffle else np.arange(n))
    return self._orders[epoch]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    first = self.batches * self.batch_rows * self.num_shards + self.shard * self.batch_rows
    n = len(self.train)
    picks = [self.train[self._order(g // n)[g % n]] for g in range(first, first + self.batch_rows)]
    self.batches += 1
    return self.examples.rows(picks)

  def state(self) -> dict:
    return {"batches": self.batches}


def load_examples(path: str, tokenizer: str, objective: str, seq_len: int, *,
                  heldout_fraction: float, template: ChatTemplate = ChatTemplate(),
                  seed: int = 0, shuffle: bool = True) -> RewardExamples:
  """Reads, validates, renders and tokenizes every record of a reward JSONL (.gz allowed)."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"RewardData.path: {path}: no such file")
  tok_path = os.path.abspath(resolve_path(tokenizer))
  tok = load_tokenizer(tok_path)
  skipped: collections.Counter = collections.Counter()
  records, kept = 0, []
  for line in read_lines(path):
    if not line.strip():
      continue
    records += 1
    fields, reason = parse_record(line, objective)
    if reason:
      skipped[reason] += 1
    else:
      kept.append(fields)
  sides = 2 if objective == "pairwise" else 1
  prompts = [f[0] for f in kept for _ in range(sides)]
  ids = encode_pairs(tok, prompts, [t for f in kept for t in f[1:1 + sides]], template)
  seqs, labels, held = [], [], []
  for i, f in enumerate(kept):
    mine = ids[i * sides:(i + 1) * sides]
    if max(map(len, mine)) > seq_len:
      skipped["too_long"] += 1
      continue
    seqs += mine
    labels.append(f[-1])
    held.append(prompt_is_heldout(f[0], heldout_fraction))
  lengths = [len(s) for s in seqs]
  tokens = (np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs
            else np.zeros(0, np.int32))
  held_prompts = {f[0] for f, h in zip(kept, held) if h}
  n_prompts = (len({f[0] for f in kept}) - len(held_prompts), len(held_prompts))
  return RewardExamples(
      path, objective, tok_path, tok.get_vocab_size(with_added_tokens=True), seq_len, tokens,
      np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
      np.asarray(labels, np.float32) if objective == "pointwise" else None,
      np.asarray(held, bool), n_prompts, records, skipped, seed, shuffle)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardData:
  """Reward-model batches from a JSONL of pointwise or pairwise records (module docstring)."""
  path: str = gin.REQUIRED
  tokenizer: str = gin.REQUIRED       # the policy's tokenizer.json, or a directory holding one
  objective: str = "pointwise"        # or "pairwise"
  heldout_fraction: float = 0.1       # of the prompts, for the held-out metrics
  seed: int = 0
  shuffle: bool = True
  template: ChatTemplate | None = None   # None: ChatTemplate() as gin binds it (Instruct's)

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"RewardData.objective: 'pointwise' or 'pairwise', got "
                       f"{self.objective!r}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"RewardData.heldout_fraction: must be in [0, 1), got "
                       f"{self.heldout_fraction}")

  def load(self, seq_len: int, *, verbose: bool = True) -> RewardExamples:
    """The examples, their summary printed; an error when no example is left to train on."""
    ex = load_examples(self.path, self.tokenizer, self.objective, seq_len,
                       heldout_fraction=self.heldout_fraction,
                       template=self.template or ChatTemplate(), seed=self.seed,
                       shuffle=self.shuffle)
    if verbose:
      print(ex.summary(), flush=True)
    if not ex.records:
      raise ValueError(f"RewardData.path: {ex.path} holds no records")
    if not len(ex):
      raise ValueError(f"RewardData.path: no usable records in {ex.path} ({ex.summary()})")
    if ex.heldout.all():
      raise ValueError(f"RewardData.heldout_fraction: all {ex.prompts[1]} prompts of {ex.path} "
                       f"fell in the held-out split ({self.heldout_fraction}); nothing is left "
                       "to train on (lower heldout_fraction or add prompts)")
    return ex

  def open(self, *, model_vocab: int, batch_rows: int, seq_len: int, shard: int,
           num_shards: int, start_batch: int) -> RewardStream:
    return self.load(seq_len, verbose=shard == 0).open(
        model_vocab=model_vocab, batch_rows=batch_rows, seq_len=seq_len, shard=shard,
        num_shards=num_shards, start_batch=start_batch)
