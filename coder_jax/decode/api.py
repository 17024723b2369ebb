"""Text in, text out: `generate(model, tokenizer, prompts, ...)`, and `load(checkpoint)`."""

from __future__ import annotations

import os
from typing import Sequence

import jax.numpy as jnp

from coder_jax.data.tokenizer import BOS, EOS
from coder_jax.decode.generate import generate_ids


def _encode(tokenizer, text: str) -> list[int]:
  enc = tokenizer.encode(text, add_special_tokens=False)
  return list(enc.ids if hasattr(enc, "ids") else enc)


def _special_id(tokenizer, token: str) -> int | None:
  return tokenizer.token_to_id(token)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  cut = len(text)
  for s in stop:
    i = text.find(s)
    if s and i >= 0:
      cut = min(cut, i)
  return text[:cut]


def generate(model, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop: Sequence[str] = (), seed: int = 0, add_bos: bool = True,
             batch_size: int | None = None, attention_impl: str = "auto",
             mesh=None) -> list[str] | str:
  """Completions (prompt excluded) for one prompt or a list, cut before the first stop string.

  temperature 0 is greedy; top_k 0 / top_p 1 switch those filters off. A row ends at EOS, at a
  stop string, or after max_new_tokens. Stop strings also stop the loop early when their
  tokenization appears in the output (a stop string that BPE splits differently in context is
  still cut from the text). The same seed and inputs give the same outputs. batch_size: rows
  per compiled batch (default: all prompts at once).
  """
  single = isinstance(prompts, str)
  prompts = [prompts] if single else list(prompts)
  bos = _special_id(tokenizer, BOS) if add_bos else None
  ids = [([bos] if bos is not None else []) + _encode(tokenizer, p) for p in prompts]
  stop_ids = [_encode(tokenizer, s) for s in stop if s]
  step = batch_size or max(len(ids), 1)
  texts = []
  for start in range(0, len(ids), step):
    chunk = ids[start:start + step]
    if len(chunk) < step and start:   # keep one compiled shape for every chunk
      chunk = chunk + [chunk[0]] * (step - len(chunk))
    out = generate_ids(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=_special_id(tokenizer, EOS),
                       stop_ids=stop_ids, seed=seed + start, attention_impl=attention_impl,
                       mesh=mesh)
    texts += [cut_at_stop(tokenizer.decode(t), stop) for t in out.tokens]
  texts = texts[:len(prompts)]
  return texts[0] if single else texts


def load(checkpoint: str, *, step: int | None = None, tokenizer: str | None = None,
         dtype=jnp.float32, allow_tokenizer_mismatch: bool = False, **runtime):
  """(model, tokenizer or None) from a Hugging Face directory (config.json + safetensors) or a
  training MODEL_DIR (Orbax; latest step unless `step`). The tokenizer is the checkpoint's own
  tokenizer.json (training and HF export write it there) unless `tokenizer` is given; a given
  tokenizer whose vocabulary differs from the checkpoint's own, or that has more tokens than
  the model's vocabulary, is refused unless allow_tokenizer_mismatch."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
  if tokenizer is not None and not os.path.isfile(tokenizer):
    raise FileNotFoundError(f"--tokenizer: {tokenizer}: no such file")
  if os.path.exists(os.path.join(checkpoint, "config.json")):
    from coder_jax import hf
    model = hf.load(checkpoint, dtype, **runtime)
  else:
    from coder_jax.train.checkpoint import load_params
    model, _ = load_params(checkpoint, step, **runtime)
  own = os.path.join(checkpoint, "tokenizer.json")
  path = tokenizer or own
  if not os.path.exists(path):
    return model, None
  from coder_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(path)
  compare = tokenizer and os.path.exists(own) and not allow_tokenizer_mismatch
  check_tokenizer(tok, path, model.cfg.vocab_size, load_tokenizer(own) if compare else None, own)
  return model, tok


def check_tokenizer(tok, path: str, model_vocab: int, own=None, own_path: str = ""):
  """A tokenizer that does not belong to the model produces garbage without a word: refuse
  one larger than the model's vocabulary, or one whose vocabulary differs from `own` (the
  checkpoint's own tokenizer, when given)."""
  n = tok.get_vocab_size(with_added_tokens=True)
  if n > model_vocab:
    raise ValueError(f"tokenizer: {path} has {n} tokens but the model's vocab_size is "
                     f"{model_vocab}; it is not this model's tokenizer")
  if own is not None and own.get_vocab(with_added_tokens=True) != tok.get_vocab(
      with_added_tokens=True):
    raise ValueError(f"tokenizer: {path} is not the tokenizer this model was trained with "
                     f"({own_path}); omit it to use that one, or pass "
                     "--allow_tokenizer_mismatch if you mean it")
