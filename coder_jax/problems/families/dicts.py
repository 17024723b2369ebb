"""Problem families over dicts: frequencies, inverting, grouping, merging, queries and stock
keeping."""

from __future__ import annotations

from coder_jax.problems.families.spec import Rng, Spec, one, random_scores


def frequency_dicts(rng: Rng) -> list[Spec]:
  return [
      Spec("letter_counts(text: str) -> dict[str, int]",
           "Count the lowercase letters a-z in text: return a dict from each letter that occurs "
           "to how many times it occurs, with the keys in alphabetical order.",
           """
           counts = {}
           for ch in sorted(text):
               if "a" <= ch <= "z":
                   counts[ch] = counts.get(ch, 0) + 1
           return counts
           """, one(["hello, World"] + [rng.word(0, 12, "abcAB1 ") for _ in range(5)])),
      Spec("word_counts(sentence: str) -> dict[str, int]",
           "Return a dict from each word of sentence (words are separated by spaces) to how "
           "many times it occurs, with the keys in order of first occurrence.",
           """
           counts = {}
           for word in sentence.split():
               counts[word] = counts.get(word, 0) + 1
           return counts
           """, one(["to be or not to be"]
                    + [" ".join(rng.words(0, 6, 1, 2, "ab")) for _ in range(5)])),
      Spec("length_histogram(words: list[str]) -> dict[int, int]",
           "Return a dict from each word length that occurs in words to how many words have "
           "that length, with the keys in increasing order.",
           """
           counts = {}
           for word in sorted(words, key=len):
               counts[len(word)] = counts.get(len(word), 0) + 1
           return counts
           """, one([["a", "bb", "cc", "ddd"]] + [rng.words(0, 6, 1, 4) for _ in range(5)])),
  ]


def invert(rng: Rng) -> list[Spec]:
  distinct = [{"a": 1, "b": 2}] + [dict(zip(rng.shuffled("abcdef")[:n], rng.shuffled(range(9))))
                                   for n in rng.ints(4, 0, 5)]
  return [
      Spec("invert_dict(mapping: dict[str, int]) -> dict[int, str]",
           "Return a dict from each value of mapping to its key; the values of mapping are all "
           "different.",
           "return {value: key for key, value in mapping.items()}", one(distinct)),
      Spec("keys_by_value(mapping: dict[str, int]) -> dict[int, list[str]]",
           "Return a dict from each value of mapping to the alphabetically sorted list of the "
           "keys that have that value.",
           """
           out = {}
           for key in sorted(mapping):
               out.setdefault(mapping[key], []).append(key)
           return out
           """, one([{"x": 1, "y": 2, "z": 1}] + [{k: rng.int(0, 2) for k in rng.words(1, 5, 1, 2)}
                                                 for _ in range(5)])),
  ]


def grouping(rng: Rng) -> list[Spec]:
  ws = [["apple", "avocado", "banana", "cherry", "blueberry"]] + [rng.words(0, 6, 1, 4, "abcd")
                                                                 for _ in range(5)]
  return [
      Spec("group_by_first_letter(words: list[str]) -> dict[str, list[str]]",
           "Group the non-empty words by their first character: return a dict from each first "
           "character to the words that start with it, in their original order.",
           """
           groups = {}
           for word in words:
               groups.setdefault(word[0], []).append(word)
           return groups
           """, one(ws)),
      Spec("group_by_length(words: list[str]) -> dict[int, list[str]]",
           "Group words by length: return a dict from each length to the words of that length, "
           "in their original order.",
           """
           groups = {}
           for word in words:
               groups.setdefault(len(word), []).append(word)
           return groups
           """, one(ws)),
      Spec("group_anagrams(words: list[str]) -> dict[str, list[str]]",
           "Return a dict from each word's characters in sorted order, joined into a string, to "
           "the words of words made of exactly those characters, in their original order.",
           """
           groups = {}
           for word in words:
               groups.setdefault("".join(sorted(word)), []).append(word)
           return groups
           """, one([["eat", "tea", "tan", "ate", "nat"]] + ws[1:])),
  ]


def merging(rng: Rng) -> list[Spec]:
  pairs = [({"a": 1, "b": 5}, {"b": 2, "c": 7})] + [tuple(random_scores(rng, 2, "abcd"))
                                                     for _ in range(5)]
  return [
      Spec("merge_sum(a: dict[str, int], b: dict[str, int]) -> dict[str, int]",
           "Return a new dict with the keys of both a and b; a key in both gets the sum of its "
           "two values.",
           """
           out = dict(a)
           for key, value in b.items():
               out[key] = out.get(key, 0) + value
           return out
           """, tuple(pairs)),
      Spec("merge_max(a: dict[str, int], b: dict[str, int]) -> dict[str, int]",
           "Return a new dict with the keys of both a and b; a key in both gets the larger of "
           "its two values.",
           """
           out = dict(a)
           for key, value in b.items():
               out[key] = max(out[key], value) if key in out else value
           return out
           """, tuple(pairs)),
      Spec("common_min(a: dict[str, int], b: dict[str, int]) -> dict[str, int]",
           "Return a dict of the keys present in both a and b, each mapped to the smaller of its "
           "two values.",
           "return {key: min(value, b[key]) for key, value in a.items() if key in b}",
           tuple(pairs)),
  ]


def dict_queries(rng: Rng) -> list[Spec]:
  scores = [{"ann": 12, "bob": 3, "cy": 25}] + random_scores(rng, 5, "abcxyz")
  out = [Spec(f"keys_above_{k}(scores: dict[str, int]) -> list[str]",
              f"Return the keys of scores whose value is greater than {k}, in alphabetical order.",
              f"return sorted(key for key, value in scores.items() if value > {k})", one(scores))
         for k in (5, 20)]
  nonempty = [s for s in scores if s] + [{"b": 4, "a": 4}]
  return out + [
      Spec("key_of_max(scores: dict[str, int]) -> str",
           "Return the key with the largest value in the non-empty dict scores; on a tie, the "
           "alphabetically first of those keys.",
           "return min(scores, key=lambda key: (-scores[key], key))", one(nonempty)),
      Spec("total_for_prefix(scores: dict[str, int], prefix: str) -> int",
           "Return the sum of the values of scores whose key starts with prefix.",
           "return sum(value for key, value in scores.items() if key.startswith(prefix))",
           (({"apple": 3, "apricot": 4, "banana": 5}, "ap"),)
           + tuple((s, rng.choice("abcxyz")) for s in scores) + (({"a": 1}, ""),)),
  ]


def stock(rng: Rng) -> list[Spec]:
  items = "abcd"
  orders = [({"pen": 3, "ink": 1}, [("pen", -3), ("cap", 2), ("ink", 4)])] + [
      ({k: rng.int(1, 5) for k in rng.words(0, 3, 1, 1, items)},
       [(rng.choice(items), rng.int(-4, 4)) for _ in range(rng.int(0, 4))]) for _ in range(5)]
  sales = [[("pen", "office", 3), ("tea", "food", 2), ("ink", "office", 5)]] + [
      [(rng.word(2, 3), rng.choice(["food", "toys", "office"]), rng.int(1, 20))
       for _ in range(rng.int(0, 5))] for _ in range(5)] + [[("cup", "toys", 1)]]
  return [
      Spec("apply_orders(stock: dict[str, int], orders: list[tuple[str, int]]) -> dict[str, int]",
           "Apply orders to a copy of stock: each (item, change) adds change (possibly negative) "
           "to the item's count, which starts at 0 for an item not in stock. Return the copy "
           "without the items whose final count is 0 or less.",
           """
           result = dict(stock)
           for item, change in orders:
               result[item] = result.get(item, 0) + change
           return {item: count for item, count in result.items() if count > 0}
           """, tuple(orders)),
      Spec("totals_by_category(sales: list[tuple[str, str, int]]) -> dict[str, int]",
           "Each sale is a tuple (name, category, amount); return a dict from each category to "
           "the sum of the amounts of its sales, with the categories in order of first "
           "appearance.",
           """
           totals = {}
           for _, category, amount in sales:
               totals[category] = totals.get(category, 0) + amount
           return totals
           """, one(sales)),
  ]


FAMILIES = (frequency_dicts, invert, grouping, merging, dict_queries, stock)
