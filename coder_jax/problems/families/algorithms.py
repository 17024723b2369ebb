"""Problem families of small algorithms: stairs, coins, sorting keys, intervals, edit distances,
grids, bits and calendar arithmetic."""

from __future__ import annotations

from coder_jax.problems.families.spec import Rng, Spec, one, random_scores


def stairs(rng: Rng) -> list[Spec]:
  out = []
  for k in (2, 3):
    out.append(Spec(f"climb_ways_{k}(n: int) -> int",
                    f"Return in how many ways n stairs (n >= 0) can be climbed taking 1 to {k} "
                    "stairs at a time; the order of the steps matters, and 0 stairs have one way.",
                    f"""
                    ways = [1] + [0] * n
                    for i in range(1, n + 1):
                        ways[i] = sum(ways[i - s] for s in range(1, {k} + 1) if s <= i)
                    return ways[n]
                    """, one([4, 0, 1] + rng.ints(3, 2, 25))))
  for a, b in ((1, 3), (2, 5)):
    out.append(Spec(f"climb_ways_{a}_or_{b}(n: int) -> int",
                    f"Return in how many ways n stairs (n >= 0) can be climbed taking exactly {a} "
                    f"or {b} stairs at a time; the order of the steps matters, and 0 stairs have "
                    "one way.",
                    f"""
                    ways = [1] + [0] * n
                    for i in range(1, n + 1):
                        ways[i] = sum(ways[i - s] for s in ({a}, {b}) if s <= i)
                    return ways[n]
                    """, one([6, 0, 1] + rng.ints(3, 2, 30))))
  return out


def coins(rng: Rng) -> list[Spec]:
  out = []
  for values in ((1, 5, 10, 25), (1, 3, 4), (2, 5), (5, 7)):
    names = ", ".join(map(str, values[:-1])) + f" and {values[-1]}"
    out.append(Spec("min_coins(amount: int) -> int",
                    f"Return the smallest number of coins of values {names} (as many of each as "
                    "needed) that add up to amount >= 0, or -1 if no combination does.",
                    f"""
                    best = [0] + [-1] * amount
                    for a in range(1, amount + 1):
                        for c in {values}:
                            if c <= a and best[a - c] >= 0:
                                if best[a] < 0 or best[a - c] + 1 < best[a]:
                                    best[a] = best[a - c] + 1
                    return best[amount]
                    """, one([6, 0, 1, 3] + rng.ints(3, 2, 60))))
  out.append(Spec("count_change(amount: int) -> int",
                  "Return in how many ways amount >= 0 can be made from coins of values 1, 2 and "
                  "5, where the order of the coins does not matter (0 has one way).",
                  """
                  ways = [1] + [0] * amount
                  for c in (1, 2, 5):
                      for a in range(c, amount + 1):
                          ways[a] += ways[a - c]
                  return ways[amount]
                  """, one([5, 0, 1] + rng.ints(3, 2, 60))))
  return out


def sort_keys(rng: Rng) -> list[Spec]:
  ws = [["pear", "fig", "apple", "kiwi"]] + [rng.words(0, 6, 1, 5, "abcde") for _ in range(5)]
  return [
      Spec("sort_by_length(words: list[str]) -> list[str]",
           "Return words sorted by length, and alphabetically among words of equal length.",
           "return sorted(words, key=lambda w: (len(w), w))", one(ws)),
      Spec("sort_by_last_char(words: list[str]) -> list[str]",
           "Return the non-empty words sorted by their last character; words with the same last "
           "character keep their original order.",
           "return sorted(words, key=lambda w: w[-1])", one(ws)),
      Spec("rank_by_score(scores: dict[str, int]) -> list[str]",
           "Return the keys of scores ordered by value from highest to lowest, and "
           "alphabetically among equal values.",
           "return sorted(scores, key=lambda key: (-scores[key], key))",
           one([{"bo": 3, "al": 9, "cy": 3}] + random_scores(rng, 5))),
      Spec("sort_by_digit_sum(numbers: list[int]) -> list[int]",
           "Return the non-negative numbers sorted by the sum of their decimal digits, and by "
           "value among numbers with equal digit sums.",
           "return sorted(numbers, key=lambda n: (sum(int(d) for d in str(n)), n))",
           one([[19, 5, 30, 111, 41]] + rng.lists(5, 0, 7, 0, 300))),
  ]


def intervals(rng: Rng) -> list[Spec]:
  def some(n):
    return [(a, a + rng.int(0, 6)) for a in rng.ints(n, 0, 20)]
  sets = [[(1, 3), (2, 6), (8, 10), (10, 12)], []] + [some(rng.int(1, 5)) for _ in range(4)]
  return [
      Spec("merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]",
           "Merge the closed intervals (start, end), start <= end, that overlap or share an "
           "endpoint, and return the result sorted by start.",
           """
           merged = []
           for start, end in sorted(intervals):
               if merged and start <= merged[-1][1]:
                   merged[-1] = (merged[-1][0], max(merged[-1][1], end))
               else:
                   merged.append((start, end))
           return merged
           """, one(sets)),
      Spec("covered_length(intervals: list[tuple[int, int]]) -> int",
           "Return the total length of the number line covered by the union of the closed "
           "intervals (start, end), start <= end, where one interval covers end - start.",
           """
           total, reach = 0, None
           for start, end in sorted(intervals):
               if reach is None or start > reach:
                   total += end - start
                   reach = end
               elif end > reach:
                   total += end - reach
                   reach = end
           return total
           """, one(sets)),
      Spec("intervals_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool",
           "Return True if the closed intervals a and b, each (start, end) with start <= end, "
           "share at least one point.",
           "return a[0] <= b[1] and b[0] <= a[1]",
           (((1, 5), (5, 9)), ((1, 2), (3, 4)), ((0, 10), (2, 3)))
           + tuple(tuple(some(2)) for _ in range(4))),
  ]


def string_distances(rng: Rng) -> list[Spec]:
  pairs = [("kitten", "sitting"), ("", "abc"), ("same", "same")] + [
      (rng.word(0, 7, "abc"), rng.word(0, 7, "abc")) for _ in range(4)]
  return [
      Spec("edit_distance(a: str, b: str) -> int",
           "Return the smallest number of single-character insertions, deletions and "
           "substitutions that turn a into b.",
           """
           prev = list(range(len(b) + 1))
           for i, ca in enumerate(a, 1):
               cur = [i]
               for j, cb in enumerate(b, 1):
                   cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
               prev = cur
           return prev[-1]
           """, tuple(pairs)),
      Spec("common_prefix(words: list[str]) -> str",
           "Return the longest string that every string of the non-empty list words starts "
           "with.",
           """
           prefix = words[0]
           for word in words[1:]:
               while not word.startswith(prefix):
                   prefix = prefix[:-1]
           return prefix
           """, one([["flower", "flow", "flight"], ["a"], ["ab", "cd"]]
                    + [[rng.choice(["ab", "abc", ""]) + w for w in rng.words(1, 4, 0, 3, "ab")]
                       for _ in range(4)])),
      Spec("lcs_length(a: str, b: str) -> int",
           "Return the length of the longest sequence of characters that occurs in both a and b "
           "in order, not necessarily contiguously.",
           """
           prev = [0] * (len(b) + 1)
           for ca in a:
               cur = [0]
               for j, cb in enumerate(b, 1):
                   cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
               prev = cur
           return prev[-1]
           """, tuple(pairs)),
  ]


def grids(rng: Rng) -> list[Spec]:
  maps = [[[1, 1, 0], [0, 0, 1], [1, 0, 1]], [[0]]] + [
      rng.lists(rng.int(1, 5), c, c, 0, 1) for c in rng.ints(4, 1, 5)]
  return [
      Spec("manhattan_distance(p: tuple[int, int], q: tuple[int, int]) -> int",
           "Return the Manhattan distance |x1 - x2| + |y1 - y2| between the points p and q, "
           "each (x, y).",
           "return abs(p[0] - q[0]) + abs(p[1] - q[1])",
           (((1, 2), (4, 6)), ((0, 0), (0, 0))) + tuple(
               ((rng.int(-9, 9), rng.int(-9, 9)), (rng.int(-9, 9), rng.int(-9, 9)))
               for _ in range(4))),
      Spec("count_islands(grid: list[list[int]]) -> int",
           "The non-empty rectangular grid holds 1 for land and 0 for water. Return how many "
           "islands it has: groups of land cells joined up, down, left or right.",
           """
           rows, cols = len(grid), len(grid[0])
           seen = set()
           count = 0
           for r in range(rows):
               for c in range(cols):
                   if grid[r][c] == 1 and (r, c) not in seen:
                       count += 1
                       seen.add((r, c))
                       stack = [(r, c)]
                       while stack:
                           y, x = stack.pop()
                           for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                               if 0 <= ny < rows and 0 <= nx < cols and grid[ny][nx] == 1:
                                   if (ny, nx) not in seen:
                                       seen.add((ny, nx))
                                       stack.append((ny, nx))
           return count
           """, one(maps)),
      Spec("grid_paths(rows: int, cols: int) -> int",
           "Return how many paths lead from the top left to the bottom right cell of a grid "
           "with rows >= 1 rows and cols >= 1 columns, moving one cell right or down at a time.",
           """
           ways = [1] * cols
           for _ in range(1, rows):
               for c in range(1, cols):
                   ways[c] += ways[c - 1]
           return ways[-1]
           """, ((3, 3), (1, 5), (2, 2)) + tuple((rng.int(1, 8), rng.int(1, 8)) for _ in range(4))),
  ]


def bits(rng: Rng) -> list[Spec]:
  xs = [13, 0, 255] + rng.ints(4, 1, 255)
  return [
      Spec("count_set_bits(n: int) -> int",
           "Return how many 1 bits the binary form of the non-negative integer n has.",
           'return bin(n).count("1")', one(xs)),
      Spec("hamming_distance(a: int, b: int) -> int",
           "Return in how many bit positions the non-negative integers a and b differ.",
           'return bin(a ^ b).count("1")',
           ((1, 4), (7, 7)) + tuple((x, rng.int(0, 255)) for x in xs[2:])),
      Spec("reverse_byte(n: int) -> int",
           "Return the number whose 8-bit binary form is that of n (0 <= n < 256) reversed, so "
           "1 gives 128.",
           """
           out = 0
           for _ in range(8):
               out = (out << 1) | (n & 1)
               n >>= 1
           return out
           """, one(xs)),
      Spec("lowest_set_bit(n: int) -> int",
           "Return the value of the lowest 1 bit of the positive integer n, so 12 gives 4.",
           "return n & -n", one([40] + xs[2:] + [1, 64])),
  ]


def calendar(rng: Rng) -> list[Spec]:
  years = [2024, 1900, 2000, 2023] + rng.ints(3, 1600, 2400)
  return [
      Spec("format_duration(seconds: int) -> str",
           "Format a non-negative number of seconds as 'H:MM:SS': hours without padding (they "
           "may exceed 23), minutes and seconds as two digits.",
           """
           hours, rest = divmod(seconds, 3600)
           minutes, secs = divmod(rest, 60)
           return str(hours) + ":" + str(minutes).zfill(2) + ":" + str(secs).zfill(2)
           """, one([3725, 0, 59, 86400] + rng.ints(3, 1, 200000))),
      Spec("minutes_between(start: str, end: str) -> int",
           "start and end are times 'HH:MM' on a 24-hour clock; return how many minutes pass "
           "from start to the next time the clock shows end (0 when they are equal).",
           """
           h1, m1 = map(int, start.split(":"))
           h2, m2 = map(int, end.split(":"))
           return (h2 * 60 + m2 - h1 * 60 - m1) % (24 * 60)
           """, (("09:15", "10:00"), ("23:30", "00:15"), ("12:00", "12:00")) + tuple(
               tuple(f"{rng.int(0, 23):02d}:{rng.int(0, 59):02d}" for _ in range(2))
               for _ in range(4))),
      Spec("is_leap_year(year: int) -> bool",
           "Return True if year is a leap year of the Gregorian calendar: divisible by 4, "
           "except years divisible by 100 that are not divisible by 400.",
           "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)", one(years)),
      Spec("day_of_year(year: int, month: int, day: int) -> int",
           "Return the number of the given date within its year in the Gregorian calendar, "
           "where January 1 is day 1.",
           """
           leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
           days = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
           return sum(days[:month - 1]) + day
           """, ((2024, 3, 1), (2023, 3, 1), (2000, 12, 31), (1900, 12, 31)) + tuple(
               (y, rng.int(1, 12), rng.int(1, 28)) for y in years[4:])),
  ]


FAMILIES = (stairs, coins, sort_keys, intervals, string_distances, grids, bits, calendar)
