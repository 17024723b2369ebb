"""Problem families over words and substrings: word operations, naming styles, palindromes,
substring search, anagrams, transforms and parsing."""

from __future__ import annotations

from coder_jax.problems.families.spec import MIXED, Rng, Spec, one, random_sentences


def words(rng: Rng) -> list[Spec]:
  sentences = ["the quick brown fox"] + random_sentences(rng, 5, 1, 6)
  return [
      Spec("reverse_words(sentence: str) -> str",
           "Return the words of sentence (separated by single spaces) in reverse order, joined "
           "by single spaces.",
           'return " ".join(sentence.split()[::-1])', one(sentences)),
      Spec("capitalize_words(sentence: str) -> str",
           "Return sentence with the first letter of every word made uppercase and the rest of "
           "each word unchanged; words are separated by single spaces.",
           'return " ".join(w[:1].upper() + w[1:] for w in sentence.split(" "))',
           one(sentences + ["mIxEd case"])),
      Spec("longest_word(sentence: str) -> str",
           "Return the longest word of sentence (words are separated by spaces), the first one "
           "on a tie, or '' when there is no word.",
           """
           best = ""
           for word in sentence.split():
               if len(word) > len(best):
                   best = word
           return best
           """, one(sentences + [""])),
      Spec("count_long_words(sentence: str) -> int",
           "Return how many words of sentence (separated by spaces) have more than 4 characters.",
           "return sum(1 for w in sentence.split() if len(w) > 4)", one(sentences)),
      Spec("acronym(phrase: str) -> str",
           "Return the first letters of the words of phrase (separated by spaces), uppercased "
           "and joined.",
           'return "".join(w[0].upper() for w in phrase.split())',
           one(["portable network graphics"] + sentences[1:])),
  ]


def case_styles(rng: Rng) -> list[Spec]:
  names = [rng.words(1, 4, 1, 6) for _ in range(5)]
  camel = [ws[0] + "".join(w.capitalize() for w in ws[1:]) for ws in names]
  return [
      Spec("snake_to_camel(name: str) -> str",
           "Convert a snake_case name (lowercase words joined by single underscores) to "
           "camelCase: the first word stays as it is and every later word starts with an "
           "uppercase letter.",
           """
           first, *rest = name.split("_")
           return first + "".join(w.capitalize() for w in rest)
           """, one(["max_line_length"] + ["_".join(ws) for ws in names])),
      Spec("camel_to_snake(name: str) -> str",
           "Convert a camelCase name to snake_case: put an underscore before every uppercase "
           "letter and make it lowercase.",
           """
           out = ""
           for ch in name:
               if ch.isupper():
                   out += "_" + ch.lower()
               else:
                   out += ch
           return out
           """, one(["maxLineLength"] + camel)),
      Spec("swap_case(text: str) -> str",
           "Return text with its lowercase letters made uppercase and its uppercase letters made "
           "lowercase.",
           "return text.swapcase()", one(["Hello World"] + [rng.word(1, 15, MIXED)
                                                            for _ in range(5)])),
      Spec("to_kebab(title: str) -> str",
           "Return the words of title (separated by spaces), lowercased and joined by hyphens.",
           'return "-".join(w.lower() for w in title.split())',
           one(["Hello Big World"] + [s.title() for s in random_sentences(rng, 5)])),
  ]


def palindromes(rng: Rng) -> list[Spec]:
  ws = [rng.word(1, 5, "abc") for _ in range(3)]
  exact = ["racecar", "Racecar", ws[0] + ws[0][::-1], ws[1] + "x" + ws[1][::-1], "",
           rng.word(2, 8, "ab"), rng.word(2, 8, "ab")]
  return [
      Spec("is_palindrome(text: str) -> bool",
           "Return True if text reads the same forwards and backwards, exactly: case and "
           "spaces count.",
           "return text == text[::-1]", one(exact)),
      Spec("is_loose_palindrome(text: str) -> bool",
           "Return True if the letters and digits of text, lowercased, read the same forwards "
           "and backwards; every other character is ignored.",
           """
           kept = [ch.lower() for ch in text if ch.isalnum()]
           return kept == kept[::-1]
           """, one(["Step on no pets!", "Was it a car?", "No lemon, no melon", "ab, BA",
                     "12 3 21x"] + exact[2:4])),
      Spec("longest_palindromic_substring(text: str) -> str",
           "Return the longest substring of text that is a palindrome, the leftmost one on a "
           "tie ('' for an empty text).",
           """
           best = ""
           for i in range(len(text)):
               for j in range(i + len(best) + 1, len(text) + 1):
                   part = text[i:j]
                   if part == part[::-1]:
                       best = part
           return best
           """, one(["bananas", ""] + [rng.word(3, 12, "abc") for _ in range(5)])),
  ]


def substrings(rng: Rng) -> list[Spec]:
  pairs = (("banana", "ana"), ("aaaa", "aa"), ("abc", "d")) + tuple(
      (rng.word(4, 16, "ab"), rng.word(1, 3, "ab")) for _ in range(4))
  return [
      Spec("count_overlapping(text: str, sub: str) -> int",
           "Return how many times the non-empty string sub occurs in text, counting "
           "occurrences that overlap.",
           "return sum(1 for i in range(len(text) - len(sub) + 1) if text[i:i + len(sub)] == sub)",
           pairs),
      Spec("count_separate(text: str, sub: str) -> int",
           "Return how many times the non-empty string sub occurs in text, scanning from the "
           "left and never counting occurrences that overlap one already counted.",
           "return text.count(sub)", pairs),
      Spec("find_all(text: str, sub: str) -> list[int]",
           "Return the start indices of all occurrences of the non-empty string sub in text, "
           "overlapping ones included, in increasing order.",
           "return [i for i in range(len(text) - len(sub) + 1) if text.startswith(sub, i)]",
           pairs),
  ]


def letters(rng: Rng) -> list[Spec]:
  ws = [rng.word(2, 8, "abcde") for _ in range(3)]
  alphabet = "abcdefghijklmnopqrstuvwxyz"
  return [
      Spec("is_anagram(a: str, b: str) -> bool",
           "Return True if a and b hold exactly the same characters, each the same number of "
           "times; case and spaces count.",
           "return sorted(a) == sorted(b)",
           (("listen", "silent"), ("abc", "abd"), ("aab", "abb"), ("Ab", "ab"))
           + tuple((w, "".join(rng.shuffled(w))) for w in ws) + ((ws[0], ws[1]),)),
      Spec("is_pangram(text: str) -> bool",
           "Return True if every letter from a to z occurs in text, in either case.",
           "return all(ch in text.lower() for ch in \"abcdefghijklmnopqrstuvwxyz\")",
           one(["The quick brown fox jumps over the lazy dog", "hello world", "",
                "".join(rng.shuffled(alphabet)).upper(),
                "".join(rng.shuffled(alphabet.replace(rng.choice(alphabet), ""))) + "!"])),
      Spec("first_unique_index(text: str) -> int",
           "Return the index of the first character of text that occurs in text exactly once, "
           "or -1 if there is none.",
           """
           for i, ch in enumerate(text):
               if text.count(ch) == 1:
                   return i
           return -1
           """, one(["swiss", "aabb", ""] + [rng.word(1, 10, "abcd") for _ in range(4)])),
      Spec("most_common_char(text: str) -> str",
           "Return the character that occurs most often in the non-empty text; on a tie, the "
           "one whose first occurrence comes first.",
           """
           best = text[0]
           for ch in text:
               if text.count(ch) > text.count(best):
                   best = ch
           return best
           """, one(["mississippi", "abab"] + [rng.word(1, 12, "abcd") for _ in range(4)])),
  ]


def transforms(rng: Rng) -> list[Spec]:
  texts = [rng.word(3, 12, "abcdeXYZ") for _ in range(5)]
  return [
      Spec("alternate_case(text: str) -> str",
           "Return text with the characters at even indices (0, 2, ...) uppercased and those at "
           "odd indices lowercased.",
           'return "".join(ch.upper() if i % 2 == 0 else ch.lower() for i, ch in enumerate(text))',
           one(["python"] + texts)),
      Spec("reverse_each_word(sentence: str) -> str",
           "Reverse the characters of every word of sentence, keeping the words in their order; "
           "words are separated by single spaces.",
           'return " ".join(w[::-1] for w in sentence.split(" "))',
           one(["hello big world"] + random_sentences(rng, 5))),
      Spec("rotate_text_2(text: str) -> str",
           "Move the first 2 characters of text (which has at least 2) to its end.",
           "return text[2:] + text[:2]", one(["abcdef"] + texts)),
      Spec("rotate_text_3(text: str) -> str",
           "Move the first 3 characters of text (which has at least 3) to its end.",
           "return text[3:] + text[:3]", one(["abcdef"] + texts)),
      Spec("interleave_strings(a: str, b: str) -> str",
           "Return the characters of a and b alternately, starting with a; once one runs out, "
           "the rest of the other follows.",
           """
           out = ""
           for i in range(max(len(a), len(b))):
               if i < len(a):
                   out += a[i]
               if i < len(b):
                   out += b[i]
           return out
           """, (("abc", "12345"), ("", "xy"), ("ab", "")) + tuple(
               (rng.word(0, 6, "abc"), rng.word(0, 6, "xyz")) for _ in range(4))),
  ]


def parsing(rng: Rng) -> list[Spec]:
  texts = ["a1b22c333", "no digits", ""] + [rng.word(1, 14, "ab0123456789 -") for _ in range(4)]
  maps = [{k: rng.int(0, 99) for k in rng.words(1, 4, 1, 3, "abc")} for _ in range(4)]
  return [
      Spec("sum_of_digit_chars(text: str) -> int",
           "Return the sum of the decimal digits 0-9 occurring in text, each digit counted on its "
           "own.",
           'return sum(int(ch) for ch in text if ch in "0123456789")', one(texts)),
      Spec("extract_numbers(text: str) -> list[int]",
           "Return the maximal runs of decimal digits in text as integers, in order of "
           "appearance.",
           """
           numbers, current = [], ""
           for ch in text + " ":
               if ch in "0123456789":
                   current += ch
               elif current:
                   numbers.append(int(current))
                   current = ""
           return numbers
           """, one(texts)),
      Spec("parse_pairs(text: str) -> dict[str, int]",
           "Parse text like 'a=1;bc=22', pairs separated by ';', each a lowercase key, '=' and "
           "a non-negative integer, into a dict from key to integer; an empty text gives an "
           "empty dict, and a repeated key keeps its last value.",
           """
           result = {}
           if not text:
               return result
           for pair in text.split(";"):
               key, value = pair.split("=")
               result[key] = int(value)
           return result
           """, one(["x=1;y=20", "", "a=1;a=2"]
                    + [";".join(f"{k}={v}" for k, v in m.items()) for m in maps])),
  ]


FAMILIES = (words, case_styles, palindromes, substrings, letters, transforms, parsing)
