"""What a problem family returns (Spec), the deterministic draws families make (Rng), and
small input helpers."""

from __future__ import annotations

import dataclasses
import textwrap

_MASK = (1 << 64) - 1
MIXED = "abcdeiouxyzABEIOUZ0123 ,.!"  # letters of both cases, digits, spaces, punctuation


@dataclasses.dataclass(frozen=True)
class Spec:
  """One problem before the generator computes its example and tests from the canonical body."""
  signature: str  # "add_3(x: int) -> int": no "def", no colon
  doc: str  # what the function does, one paragraph; wrapped into the docstring
  body: str  # canonical body at any common indentation, its own blocks indented by 4
  inputs: tuple  # argument tuples; the first one is the docstring's example

  @property
  def entry_point(self) -> str:
    return self.signature.split("(", 1)[0]

  def body_lines(self) -> str:
    """The body as a completion: indented by 4 spaces, as HumanEval's solutions are."""
    return textwrap.indent(textwrap.dedent(self.body).strip("\n"), "    ") + "\n"


def one(values) -> tuple:
  """Argument tuples for a function of one parameter."""
  return tuple((v,) for v in values)


def signed(coef: int, name: str) -> str:
  """`+ 3 * x` / `- 3 * x`: generated code reads like code a person writes."""
  return f"{'+' if coef >= 0 else '-'} {abs(coef)}{' * ' + name if name else ''}"


class Rng:
  """A 64-bit LCG (Knuth's MMIX constants). `random` does not promise the same draws across
  Python versions; the shipped problems must regenerate byte for byte anywhere."""

  def __init__(self, seed: int):
    self._state = (seed * 2862933555777941757 + 3037000493) & _MASK

  def _next(self) -> int:
    self._state = (self._state * 6364136223846793005 + 1442695040888963407) & _MASK
    return self._state >> 33  # the high bits: an LCG's low bits cycle quickly

  def int(self, lo: int, hi: int) -> int:
    """Uniform in [lo, hi]; the modulo bias is negligible for the small ranges used here."""
    return lo + self._next() % (hi - lo + 1)

  def ints(self, n: int, lo: int, hi: int) -> list[int]:
    return [self.int(lo, hi) for _ in range(n)]

  def choice(self, seq):
    return seq[self.int(0, len(seq) - 1)]

  def shuffled(self, seq) -> list:
    out = list(seq)
    for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
      j = self.int(0, i)
      out[i], out[j] = out[j], out[i]
    return out

  def word(self, lo: int, hi: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    return "".join(self.choice(alphabet) for _ in range(self.int(lo, hi)))

  def words(self, lo: int, hi: int, wlo: int = 1, whi: int = 7,
            alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> list[str]:
    return [self.word(wlo, whi, alphabet) for _ in range(self.int(lo, hi))]

  def lists(self, n: int, lo_len: int, hi_len: int, lo: int, hi: int) -> list[list[int]]:
    return [self.ints(self.int(lo_len, hi_len), lo, hi) for _ in range(n)]


def random_sentences(rng: Rng, n: int, lo: int = 1, hi: int = 5) -> list[str]:
  """n strings of lo to hi lowercase words joined by single spaces."""
  return [" ".join(rng.words(lo, hi)) for _ in range(n)]


def random_scores(rng: Rng, n: int, keys: str = "abcdef") -> list[dict]:
  """n dicts of up to 5 short keys (letters from `keys`) to ints in [0, 30]."""
  return [{k: rng.int(0, 30) for k in rng.words(0, 5, 1, 2, keys)} for _ in range(n)]
