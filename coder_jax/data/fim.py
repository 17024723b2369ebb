"""Fill-in-the-middle at document level (DeepSeek-Coder-V2 Lite: rate 0.5, PSM), before packing.

Each document draws, from a generator seeded by (seed, document key) alone, whether it becomes a
FIM example and where its two character-level split points fall; so the transform does not
depend on order, sharding or restarts. Token layouts (pieces encoded separately):

  PSM: <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>
  SPM: <｜fim▁begin｜><｜fim▁hole｜> suffix <｜fim▁end｜> prefix+middle <｜end▁of▁sentence｜>
  plain document: text <｜end▁of▁sentence｜>

SPM follows the FIM paper's suffix-prefix-middle variant with DeepSeek's three markers standing
for <PRE>, <SUF>, <MID>; prefix and middle are contiguous there and are encoded together.
The end-of-sentence token is appended by the EOS step (`with_eos`), not here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import numpy as np

MODES = ("psm", "spm")


@dataclasses.dataclass(frozen=True)
class FimConfig:
  rate: float = 0.5          # fraction of documents turned into FIM examples
  spm_rate: float = 0.0      # of those, the fraction laid out SPM instead of PSM
  seed: int = 0

  def __post_init__(self):
    for name in ("rate", "spm_rate"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {v}")


@dataclasses.dataclass(frozen=True)
class FimIds:
  fim_begin: int
  fim_hole: int
  fim_end: int


def document_rng(seed: int, key: str) -> np.random.Generator:
  digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def plan(text: str, key: str, cfg: FimConfig) -> tuple[str, tuple[str, str, str] | None]:
  """('plain', None) or (mode, (prefix, middle, suffix)) with prefix+middle+suffix == text."""
  rng = document_rng(cfg.seed, key)
  if rng.random() >= cfg.rate:
    return "plain", None
  mode = "spm" if rng.random() < cfg.spm_rate else "psm"
  # Two uniform cut points over the n+1 gaps between characters, sorted.
  a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
  return mode, (text[:a], text[a:b], text[b:])


def fim_tokens(text: str, key: str, cfg: FimConfig, ids: FimIds,
               encode: Callable[[str], Sequence[int]]) -> list[int]:
  """The document's token ids (without EOS) in its planned layout."""
  mode, pieces = plan(text, key, cfg)
  if pieces is None:
    return list(encode(text))
  prefix, middle, suffix = pieces
  if mode == "psm":
    return ([ids.fim_begin, *encode(prefix), ids.fim_hole, *encode(suffix), ids.fim_end,
             *encode(middle)])
  return [ids.fim_begin, ids.fim_hole, *encode(suffix), ids.fim_end, *encode(prefix + middle)]
