"""Where a long text may be cut so that its pieces tokenize as the whole did.

Tokenizing, tokenizer training and FIM must never hold a whole multi-megabyte document at once
(the Rust tokenizer's encodings cost some 400 bytes per token), so long texts are handled in
pieces. Byte-level BPE never merges across its pre-tokenizer's boundaries, and two kinds of
places are such boundaries for the GPT-2 style split (and for DeepSeek's, which isolates line
breaks): right after a line break that has a non-space character on both sides ("x\\ny"), and
right before a single space between two non-space characters ("x y"). Cuts go at the last such
place in the window's second half, lines first, so the pieces of ordinary code encode to exactly
the ids of the whole. Text without either (one line without spaces) is cut at the window size;
only the few tokens at such a cut can differ from the whole's.
"""

from __future__ import annotations

from typing import Iterator


def _boundary(text: str, lo: int, hi: int) -> int | None:
  """The last cut position in (lo, hi] of the two kinds the module docstring names, or None."""
  last = len(text) - 1
  at = hi
  while (nl := text.rfind("\n", lo, at)) >= 0:  # "x\ny": cut after the "\n"
    if 0 < nl < last and not text[nl - 1].isspace() and not text[nl + 1].isspace():
      return nl + 1
    at = nl
  at = hi
  while (sp := text.rfind(" ", lo + 1, at)) >= 0:  # "x y": cut before the " "
    if sp < last and not text[sp - 1].isspace() and not text[sp + 1].isspace():
      return sp
    at = sp
  return None


def chunk_bounds(text: str, max_chars: int) -> Iterator[tuple[int, int]]:
  """(start, end) of consecutive pieces of `text`, each of at most max_chars characters."""
  if max_chars < 2:
    raise ValueError(f"max_chars: must be at least 2, got {max_chars}")
  at, n = 0, len(text)
  while n - at > max_chars:
    end = _boundary(text, at + max_chars // 2, at + max_chars) or at + max_chars
    yield at, end
    at = end
  yield at, n


def chunks(text: str, max_chars: int) -> Iterator[str]:
  for a, b in chunk_bounds(text, max_chars):
    yield text[a:b]
