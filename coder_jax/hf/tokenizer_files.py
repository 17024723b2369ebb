"""The tokenizer half of an HF export: tokenizer.json, tokenizer_config.json and
generation_config.json.

Written so that `AutoTokenizer.from_pretrained(dir)` and `pipeline("text-generation", model=dir)`
behave as on the released DeepSeek-Coder-V2 checkpoints: every encoding starts with BOS (as
coder_jax.decode's prompts do), the Instruct chat template is attached, generation stops at EOS.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tokenizers
from tokenizers import processors

from coder_jax.data.tokenizer import BOS, EOS, PAD, load_tokenizer
from coder_jax.hf.errors import CheckpointError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP)

# DeepSeek-Coder-V2-Instruct's template, character for character: a system message is its text
# then a blank line; user turns "User: q\n\n"; assistant turns "Assistant: a" + EOS.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# Takes tokenizer.json as it is (transformers 5: its tokenizers backend; 4: the generic fast
# tokenizer, which ignores add_bos_token, hence the post-processor). The released checkpoints'
# "LlamaTokenizerFast" makes transformers 5 warn that the file is byte-level, not Llama's.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _ensure_bos(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """tok, encoding with BOS first when special tokens are on (DeepSeek's tokenizer.json does;
  transformers' pipeline encodes that way, and it must see the ids coder_jax.decode sees)."""
  bos = tok.token_to_id(BOS)
  probe = "def f():"
  if tok.encode(probe).ids == [bos] + tok.encode(probe, add_special_tokens=False).ids:
    return tok
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)])
  return tok


def _dump(d: dict) -> str:
  return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def export_files(tokenizer_path: str, *, vocab_size: int,
                 model_max_length: int) -> tuple[dict[str, str], dict[str, int]]:
  """({file name: text}, {"bos_token_id", "eos_token_id", "pad_token_id"}) for an export whose
  model has `vocab_size` ids. Raises ValueError / FileNotFoundError before anything is written."""
  tok = _ensure_bos(load_tokenizer(tokenizer_path))   # checks DeepSeek's special tokens exist
  n = max(tok.get_vocab(with_added_tokens=True).values()) + 1
  if n > vocab_size:
    raise ValueError(f"{tokenizer_path}: tokenizer has ids up to {n - 1} but the model's "
                     f"vocab_size is {vocab_size}; is this the model's tokenizer?")
  pad = PAD if tok.token_to_id(PAD) is not None else EOS   # the released ones pad with EOS
  ids = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS),
         "pad_token_id": tok.token_to_id(pad)}
  config = {
      "tokenizer_class": TOKENIZER_CLASS, "bos_token": BOS, "eos_token": EOS, "pad_token": pad,
      "unk_token": None, "add_bos_token": True, "add_eos_token": False,
      "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
      "chat_template": CHAT_TEMPLATE}
  files = {TOKENIZER_JSON: tok.to_str(pretty=True), TOKENIZER_CONFIG: _dump(config),
           GENERATION_CONFIG: _dump(ids)}
  return files, ids


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
  """What an HF directory says about its tokenizer."""
  path: str                        # the tokenizer.json
  tokenizer: tokenizers.Tokenizer  # loaded as coder_jax.data.tokenizer.load_tokenizer does
  config: dict                     # tokenizer_config.json ({} when absent)
  generation: dict                 # generation_config.json ({} when absent)

  @property
  def chat_template(self) -> str | None:
    return self.config.get("chat_template")

  @property
  def bos_id(self) -> int:
    return self.tokenizer.token_to_id(BOS)

  @property
  def eos_id(self) -> int:
    return self.tokenizer.token_to_id(EOS)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as fh:
      d = json.load(fh)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return d


def load_tokenizer_files(path: str) -> TokenizerFiles | None:
  """The tokenizer files of HF directory `path`, checked; None when it has no tokenizer.json."""
  tj = os.path.join(path, TOKENIZER_JSON)
  if not os.path.isfile(tj):
    return None
  try:
    tok = load_tokenizer(tj)
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(str(e)) from None
  return TokenizerFiles(tj, tok, _read_json(os.path.join(path, TOKENIZER_CONFIG)),
                        _read_json(os.path.join(path, GENERATION_CONFIG)))
