"""Problem families over the characters of strings: counting, filtering, ciphers, run-length
codes, padding and brackets."""

from __future__ import annotations

from coder_jax.problems.families.spec import MIXED, Rng, Spec, one, random_sentences


def count_chars(rng: Rng) -> list[Spec]:
  texts = ["Hello World 42"] + [rng.word(0, 20, MIXED) for _ in range(5)]
  return [
      Spec("count_vowels(text: str) -> int",
           "Return how many characters of text are vowels (a, e, i, o, u, in either case).",
           'return sum(1 for ch in text if ch in "aeiouAEIOU")', one(texts)),
      Spec("count_digit_chars(text: str) -> int",
           "Return how many characters of text are the decimal digits 0-9.",
           'return sum(1 for ch in text if ch in "0123456789")', one(texts)),
      Spec("count_uppercase(text: str) -> int",
           "Return how many characters of text are the uppercase ASCII letters A-Z.",
           'return sum(1 for ch in text if "A" <= ch <= "Z")', one(texts)),
      Spec("count_words(text: str) -> int",
           "Return how many words text has; words are separated by one or more spaces.",
           "return len(text.split())", one(texts + ["  two   words "])),
      Spec("count_letter_e(text: str) -> int",
           "Return how many times the letter e occurs in text, in either case.",
           'return text.lower().count("e")', one(["Even Eve"] + texts[1:] + ["eEe"])),
  ]


def remove_chars(rng: Rng) -> list[Spec]:
  texts = [rng.word(1, 20, MIXED) for _ in range(5)]
  return [
      Spec("remove_vowels(text: str) -> str",
           "Return text without its vowels (a, e, i, o, u, in either case).",
           'return "".join(ch for ch in text if ch not in "aeiouAEIOU")',
           one(["Programming"] + texts)),
      Spec("remove_digits(text: str) -> str",
           "Return text without the decimal digits 0-9.",
           'return "".join(ch for ch in text if ch not in "0123456789")',
           one(["r2d2 and c3po"] + texts)),
      Spec("collapse_spaces(text: str) -> str",
           "Return text with every run of spaces replaced by a single space and no spaces at "
           "either end.",
           'return " ".join(text.split())',
           one(["  too   many  spaces "] + [s.replace(" ", "   ") for s in random_sentences(rng, 4)]
               + ["x"])),
      Spec("keep_letters(text: str) -> str",
           "Return only the ASCII letters of text, in order.",
           'return "".join(ch for ch in text if ch.isascii() and ch.isalpha())',
           one(["a1-b2 c3!"] + texts)),
  ]


def caesar(rng: Rng) -> list[Spec]:
  texts = [rng.word(1, 16, "abcxyzABCXYZ mno,.") for _ in range(5)]
  return [Spec(f"caesar_{k}(text: str) -> str",
               f"Shift every ASCII letter of text {k} places forward in the alphabet, wrapping "
               "around from z to a and keeping its case; other characters stay as they are.",
               f"""
               out = []
               for ch in text:
                   if "a" <= ch <= "z":
                       out.append(chr((ord(ch) - ord("a") + {k}) % 26 + ord("a")))
                   elif "A" <= ch <= "Z":
                       out.append(chr((ord(ch) - ord("A") + {k}) % 26 + ord("A")))
                   else:
                       out.append(ch)
               return "".join(out)
               """, one(["Hello, xyz!"] + texts)) for k in (1, 3, 13, 5, 25)]


def run_length(rng: Rng) -> list[Spec]:
  texts = ["aaabccdddd"] + [rng.word(1, 14, "aab") for _ in range(5)]

  def encode(text):  # inputs for rle_decode; the problem's own solution is independent code
    out, i = "", 0
    while i < len(text):
      j = i
      while j < len(text) and text[j] == text[i]:
        j += 1
      out, i = out + text[i] + str(j - i), j
    return out

  return [
      Spec("rle_encode(text: str) -> str",
           "Run-length encode text, which has no digits: each maximal run of one character "
           "becomes the character followed by the length of the run.",
           """
           out = ""
           i = 0
           while i < len(text):
               j = i
               while j < len(text) and text[j] == text[i]:
                   j += 1
               out += text[i] + str(j - i)
               i = j
           return out
           """, one(texts + [""])),
      Spec("rle_decode(code: str) -> str",
           "Decode a run-length code: letters, each followed by a positive decimal count of "
           "how many times it repeats.",
           """
           out = ""
           i = 0
           while i < len(code):
               j = i + 1
               while j < len(code) and code[j].isdigit():
                   j += 1
               out += code[i] * int(code[i + 1:j])
               i = j
           return out
           """, one([encode(t) for t in texts] + ["x12y1"])),
      Spec("compress_runs(text: str) -> str",
           "Replace every run of two or more equal characters of text (which has no digits) by "
           "the character followed by the length of the run; single characters stay as they are.",
           """
           out = ""
           i = 0
           while i < len(text):
               j = i
               while j < len(text) and text[j] == text[i]:
                   j += 1
               out += text[i] + (str(j - i) if j - i > 1 else "")
               i = j
           return out
           """, one(texts)),
  ]


def repeat_and_pad(rng: Rng) -> list[Spec]:
  texts = [rng.word(0, 12, "abc12xyz") for _ in range(5)]
  return [
      Spec("repeat_chars_2(text: str) -> str",
           "Return text with every character repeated 2 times in place.",
           'return "".join(ch * 2 for ch in text)', one(["abc"] + texts)),
      Spec("repeat_chars_3(text: str) -> str",
           "Return text with every character repeated 3 times in place.",
           'return "".join(ch * 3 for ch in text)', one(["ab"] + texts)),
      Spec("zero_pad_8(text: str) -> str",
           "Return text padded on the left with '0' characters to a length of 8; text of 8 or "
           "more characters is returned unchanged.",
           'return "0" * (8 - len(text)) + text', one(["42"] + texts + ["123456789"])),
      Spec("dot_fill_10(text: str) -> str",
           "Return text padded on the right with '.' characters to a length of 10; text of 10 "
           "or more characters is returned unchanged.",
           'return text + "." * (10 - len(text))', one(["title"] + texts + ["abcdefghijkl"])),
  ]


def brackets(rng: Rng) -> list[Spec]:
  parens = ["(()())", ")(", "(()", ""] + [rng.word(1, 10, "()") for _ in range(4)]
  mixed = ["([]{})", "([)]", "{[}", "a(b)c"] + [rng.word(1, 8, "()[]{}") for _ in range(3)]
  return [
      Spec("is_balanced(text: str) -> bool",
           "Return True if the parentheses in text are balanced: every ')' closes an earlier "
           "unmatched '(' and none stays open. Other characters are ignored.",
           """
           depth = 0
           for ch in text:
               if ch == "(":
                   depth += 1
               elif ch == ")":
                   depth -= 1
                   if depth < 0:
                       return False
           return depth == 0
           """, one(parens + ["(a)(b)"])),
      Spec("is_balanced_brackets(text: str) -> bool",
           "Return True if the brackets (), [] and {} in text are balanced and properly nested. "
           "Other characters are ignored.",
           """
           pairs = {")": "(", "]": "[", "}": "{"}
           stack = []
           for ch in text:
               if ch in "([{":
                   stack.append(ch)
               elif ch in pairs:
                   if not stack or stack.pop() != pairs[ch]:
                       return False
           return not stack
           """, one(mixed)),
      Spec("max_nesting_depth(text: str) -> int",
           "Return the largest number of parentheses open at the same time in text, whose "
           "parentheses are balanced.",
           """
           depth = best = 0
           for ch in text:
               if ch == "(":
                   depth += 1
                   best = max(best, depth)
               elif ch == ")":
                   depth -= 1
           return best
           """, one(["(()(()))", "", "()()", "x(y)"] + ["(" * k + ")" * k for k in (3, 5)])),
      Spec("insertions_to_balance(text: str) -> int",
           "Return the smallest number of parentheses that must be inserted into text, a string "
           "of '(' and ')', to make it balanced.",
           """
           open_count, inserts = 0, 0
           for ch in text:
               if ch == "(":
                   open_count += 1
               elif open_count:
                   open_count -= 1
               else:
                   inserts += 1
           return inserts + open_count
           """, one(parens)),
  ]


FAMILIES = (count_chars, remove_chars, caesar, run_length, repeat_and_pad, brackets)
