"""Needle in a haystack, as DeepSeek-Coder-V2's long-context figure: the line
"The secret number is NNNN." hidden at a depth of filler code, a prompt that asks for it, and
greedy decoding to answer.

    python -m coder_jax.eval niah --checkpoint DIR --lengths 1k,2k,4k \
        --depths 0,0.25,0.5,0.75,1 --out DIR

A length is the whole window: BOS + haystack with the needle + question take length -
max_new_tokens tokens, so the answer ends at position `length`. The needle goes on a line of its
own at the start of the haystack line nearest below `depth` of it (depth 1: after the last).
Score of a cell: 1 for the exact number, else the digits the answer's first number has in the
same places as the needle's, over the longer of the two (0 without a number). The haystack is this
interpreter's standard library source (what the tiny model was trained on; code for a code
model) unless `haystack` names other text.
Writes OUT/niah.json and OUT/niah.png (depth down, length across; red 0, yellow 0.5, green 1).
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import struct
import zlib
from typing import Callable

import numpy as np

from coder_jax.files import write_atomic

QUESTION = "\nWhat is the secret number? The secret number is"


def needle_text(number: int) -> str:
  return f"The secret number is {number}.\n"


def parse_lengths(text: str) -> list[int]:
  """'1k,2k,512' -> [512, 1024, 2048] (k = 1024), sorted, without repeats."""
  out = set()
  for item in str(text).split(","):
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", item)
    if not m or int(m.group(1)) < 1:
      raise ValueError(f"--lengths: {item!r} is not a length (e.g. 512, 1k, 128k)")
    out.add(int(m.group(1)) * (1024 if m.group(2) else 1))
  return sorted(out)


def parse_depths(text: str) -> list[float]:
  """'0,0.5,1' -> [0.0, 0.5, 1.0]: fractions of the haystack before the needle."""
  out = set()
  for item in str(text).split(","):
    try:
      d = float(item)
    except ValueError:
      raise ValueError(f"--depths: {item!r} is not a number in [0, 1]") from None
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"--depths: {d} is outside [0, 1]")
    out.add(d)
  return sorted(out)


def check_lengths(lengths, max_positions: int, where: str = "the model") -> None:
  """Every window must fit the positions the model was configured (and trained) for."""
  over = [n for n in lengths if n > max_positions]
  if over:
    raise ValueError(f"--lengths: {', '.join(map(str, over))} {'is' if len(over) == 1 else 'are'}"
                     f" beyond max_position_embeddings={max_positions} of {where} (lengths "
                     "count every position, the answer's included)")


def checkpoint_config(path: str, step: int | None = None):
  """The ModelConfig of an HF directory or training MODEL_DIR, without loading a weight."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--checkpoint: {path}: no such file or directory")
  if os.path.exists(os.path.join(path, "config.json")):
    from coder_jax import hf
    return hf.load_config(path)
  from coder_jax.train.checkpoint import read_model_config
  return read_model_config(path, step)[0]


# --- the haystack and the prompts


def _haystack_files(haystack: str | None) -> list[str]:
  root = haystack or os.path.dirname(os.__file__)
  if os.path.isfile(root):
    return [root]
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--haystack: {root}: no such file or directory")
  names = sorted(n for n in os.listdir(root) if n.endswith((".py", ".txt", ".md")))
  if not names:
    raise ValueError(f"--haystack: {root} holds no .py / .txt / .md files")
  return [os.path.join(root, n) for n in names]


class Haystack:
  """Filler token ids and the indices where its lines start, read as far as asked."""

  def __init__(self, tokenizer, haystack: str | None = None):
    self.tok = tokenizer
    self.files = _haystack_files(haystack)
    self.ids: list[int] = []
    self.line_starts: list[int] = [0]
    self._next = 0

  def take(self, n: int) -> tuple[list[int], list[int]]:
    """(first n filler ids, line starts among them); the files repeat if they run out."""
    while len(self.ids) < n:
      path = self.files[self._next % len(self.files)]
      self._next += 1
      with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
      if self._next > len(self.files) and not self.ids:
        raise ValueError("--haystack: the filler text holds no tokens")
      for enc in self.tok.encode_batch(lines, add_special_tokens=False):
        if enc.ids:
          self.ids.extend(enc.ids)
          self.line_starts.append(len(self.ids))
    return self.ids[:n], self.line_starts[:bisect.bisect_right(self.line_starts, n)]


def needle_number(seed: int, length: int, depth: float) -> int:
  return random.Random(f"{seed}:{length}:{depth}").randint(1000, 9999)


def build_prompt(tok, haystack: Haystack, *, length: int, depth: float, number: int,
                 max_new_tokens: int, bos_id: int | None) -> tuple[list[int], int, float]:
  """(prompt ids of exactly length - max_new_tokens, needle's first index, its actual depth)."""
  bos = [] if bos_id is None else [bos_id]
  # At depth 1 the needle follows the haystack's last (cut) line, so it opens a line itself.
  needle = tok.encode(("\n" if depth == 1.0 else "") + needle_text(number),
                      add_special_tokens=False).ids
  question = tok.encode(QUESTION, add_special_tokens=False).ids
  overhead = len(bos) + len(needle) + len(question)
  n_fill = length - max_new_tokens - overhead
  if n_fill < 1:
    raise ValueError(f"--lengths: {length} tokens leave no haystack: the needle and question "
                     f"take {overhead} and the answer {max_new_tokens}")
  fill, starts = haystack.take(n_fill)
  k = (n_fill if depth == 1.0
       else starts[bisect.bisect_right(starts, round(depth * n_fill)) - 1])
  ids = bos + fill[:k] + needle + fill[k:] + question
  return ids, len(bos) + k, k / n_fill


def score(answer: str, number: int) -> float:
  """1.0 for the number; else the digits in place in the answer's first number, as a share of
  the longer of the two."""
  m = re.search(r"\d+", answer)
  if not m:
    return 0.0
  got, want = m.group(0), str(number)
  if got == want:
    return 1.0
  return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def run_niah(model, tok, lengths, depths, *, max_new_tokens: int = 8, seed: int = 0,
             batch_size: int | None = None, haystack: str | None = None,
             log: Callable[[str], None] | None = None) -> dict:
  """Greedy answers for every (length, depth); {'lengths', 'depths', 'scores' [length][depth],
  'mean_score', 'cells': [per cell: length, depth, needle_depth, needle_position, number,
  answer, score]}."""
  from coder_jax import decode
  from coder_jax.data.tokenizer import BOS, EOS
  check_lengths(lengths, model.cfg.max_position_embeddings)
  hay = Haystack(tok, haystack)
  bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
  cells, scores = [], []
  for length in lengths:
    built = []
    for depth in depths:
      number = needle_number(seed, length, depth)
      ids, pos, actual = build_prompt(tok, hay, length=length, depth=depth, number=number,
                                      max_new_tokens=max_new_tokens, bos_id=bos)
      built.append((depth, number, ids, pos, actual))
    step = batch_size or len(built)
    row = []
    for start in range(0, len(built), step):
      part = built[start:start + step]
      out = decode.generate_ids(model, [b[2] for b in part], max_new_tokens=max_new_tokens,
                                temperature=0.0, eos_id=eos)
      for (depth, number, _, pos, actual), toks in zip(part, out.tokens):
        answer = tok.decode(toks)
        s = score(answer, number)
        row.append(s)
        cells.append({"length": length, "depth": depth, "needle_depth": round(actual, 4),
                      "needle_position": pos, "number": number, "answer": answer, "score": s})
    scores.append(row)
    if log:
      log(f"niah: length {length}: " + "  ".join(f"{d:g}:{s:.2f}" for d, s in zip(depths, row)))
  return {"lengths": list(lengths), "depths": list(depths), "max_new_tokens": max_new_tokens,
          "seed": seed, "scores": scores, "mean_score": float(np.mean(scores)), "cells": cells}


# --- the heat map, as a PNG written here (no plotting library needed)

# 3 x 5 glyphs, rows top to bottom, bits left to right.
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "k": (4, 5, 6, 5, 5), "%": (5, 1, 2, 4, 5),
    ".": (0, 0, 0, 0, 2),
}
_STOPS = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))


def color(s: float) -> tuple[int, int, int]:
  """Red (0) -> yellow (0.5) -> green (1), as the paper's map."""
  s = min(max(float(s), 0.0), 1.0)
  for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
    if s <= b:
      t = (s - a) / (b - a)
      return tuple(round(x + (y - x) * t) for x, y in zip(ca, cb))
  return _STOPS[-1][1]


def _text(img, x: int, y: int, text: str, scale: int = 2):
  for i, ch in enumerate(text):
    for r, bits in enumerate(_FONT[ch]):
      for c in range(3):
        if bits >> (2 - c) & 1:
          x0, y0 = x + (4 * i + c) * scale, y + r * scale
          img[y0:y0 + scale, x0:x0 + scale] = 0


def _text_width(text: str, scale: int = 2) -> int:
  return (4 * len(text) - 1) * scale


def length_label(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def heatmap(scores, lengths, depths, cell=(40, 24)) -> np.ndarray:
  """RGB uint8 image: one cell per (depth row, length column), axis labels, a colour bar."""
  cw, ch = cell
  ylabels = [f"{round(d * 100)}%" for d in depths]
  xlabels = [length_label(n) for n in lengths]
  left = max(_text_width(t) for t in ylabels) + 8
  top, bottom, bar = 8, 20, 40
  cw = max(cw, max(_text_width(t) for t in xlabels) + 4)
  w, h = left + cw * len(lengths) + bar, top + ch * len(depths) + bottom
  img = np.full((h, w, 3), 255, np.uint8)
  for j, _ in enumerate(lengths):
    for i, _ in enumerate(depths):
      y, x = top + i * ch, left + j * cw
      img[y:y + ch - 1, x:x + cw - 1] = color(scores[j][i])
  for i, t in enumerate(ylabels):
    _text(img, left - 4 - _text_width(t), top + i * ch + (ch - 10) // 2, t)
  for j, t in enumerate(xlabels):
    _text(img, left + j * cw + (cw - _text_width(t)) // 2, top + ch * len(depths) + 6, t)
  bx, span = left + cw * len(lengths) + 8, ch * len(depths) - 1
  for r in range(span):
    img[top + r, bx:bx + 10] = color(1 - r / max(span - 1, 1))
  _text(img, bx + 14, top, "1")
  _text(img, bx + 14, top + span - 10, "0")
  return img


def png_bytes(rgb: np.ndarray) -> bytes:
  """An 8-bit RGB PNG (filter 0 on every row, zlib-compressed)."""
  rgb = np.ascontiguousarray(rgb, np.uint8)
  h, w, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_outputs(result: dict, out_dir: str) -> tuple[str, str]:
  """OUT/niah.json and OUT/niah.png, each written whole then renamed into place."""
  os.makedirs(out_dir, exist_ok=True)
  paths = os.path.join(out_dir, "niah.json"), os.path.join(out_dir, "niah.png")
  image = png_bytes(heatmap(result["scores"], result["lengths"], result["depths"]))
  for path, data in zip(paths, (json.dumps(result, indent=1).encode(), image)):
    write_atomic(path, data)
  return paths


def format_summary(result: dict) -> str:
  head = "depth \\ length " + " ".join(f"{length_label(n):>6}" for n in result["lengths"])
  rows = [f"{d:>14.0%} " + " ".join(f"{result['scores'][j][i]:>6.2f}"
                                    for j in range(len(result["lengths"])))
          for i, d in enumerate(result["depths"])]
  return "\n".join([head, *rows, f"mean score {result['mean_score']:.3f}"])
