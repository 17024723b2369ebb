"""Problem families over lists of integers: filters, thresholds, running values, rotation,
order statistics, duplicates, windows, search, combining, runs, matrices and frequencies."""

from __future__ import annotations

from coder_jax.problems.families.spec import Rng, Spec, one


def filters(rng: Rng) -> list[Spec]:
  out = []
  for name, doc, cond in (("keep_even", "the even numbers", "x % 2 == 0"),
                          ("keep_odd", "the odd numbers", "x % 2 != 0"),
                          ("keep_multiples_of_3", "the multiples of 3", "x % 3 == 0"),
                          ("keep_multiples_of_5", "the multiples of 5", "x % 5 == 0"),
                          ("keep_positive", "the numbers greater than 0", "x > 0")):
    xs = [[1, 2, 3, 4, 5, 6, 10, -3]] + rng.lists(5, 0, 8, -20, 30)
    out.append(Spec(f"{name}(numbers: list[int]) -> list[int]",
                    f"Return {doc} of numbers, in their original order.",
                    f"return [x for x in numbers if {cond}]", one(xs)))
  return out


def thresholds(rng: Rng) -> list[Spec]:
  xs = [[3, 12, 7, 50, -4, 11]] + rng.lists(5, 0, 8, -20, 60)
  return [
      Spec("sum_above_10(numbers: list[int]) -> int",
           "Return the sum of the numbers in numbers that are greater than 10.",
           "return sum(x for x in numbers if x > 10)", one(xs)),
      Spec("count_negative(numbers: list[int]) -> int",
           "Return how many numbers in numbers are below 0.",
           "return sum(1 for x in numbers if x < 0)", one(xs + [[-1, -2]])),
      Spec("count_between_5_and_15(numbers: list[int]) -> int",
           "Return how many numbers in numbers are at least 5 and at most 15.",
           "return sum(1 for x in numbers if 5 <= x <= 15)", one(xs + [[5, 15, 16, 4]])),
      Spec("max_below_50(numbers: list[int]) -> int | None",
           "Return the largest number in numbers that is smaller than 50, or None if there is "
           "none.",
           """
           below = [x for x in numbers if x < 50]
           return max(below) if below else None
           """, one(xs + [[50, 60], []])),
      Spec("sum_of_squares(numbers: list[int]) -> int",
           "Return the sum of the squares of the numbers in numbers.",
           "return sum(x * x for x in numbers)", one(xs)),
  ]


def running(rng: Rng) -> list[Spec]:
  xs = [[3, 1, 4, 1, 5, 9, 2]] + rng.lists(5, 0, 8, -10, 20)
  return [
      Spec("running_sum(numbers: list[int]) -> list[int]",
           "Return the running sums of numbers: item i is the sum of numbers[0] to numbers[i].",
           """
           out, total = [], 0
           for x in numbers:
               total += x
               out.append(total)
           return out
           """, one(xs)),
      Spec("running_max(numbers: list[int]) -> list[int]",
           "Return the running maxima of numbers: item i is the largest of numbers[0] to "
           "numbers[i].",
           """
           out = []
           for x in numbers:
               out.append(x if not out else max(out[-1], x))
           return out
           """, one(xs)),
      Spec("running_min(numbers: list[int]) -> list[int]",
           "Return the running minima of numbers: item i is the smallest of numbers[0] to "
           "numbers[i].",
           """
           out = []
           for x in numbers:
               out.append(x if not out else min(out[-1], x))
           return out
           """, one(xs)),
      Spec("differences(numbers: list[int]) -> list[int]",
           "Return the difference of each pair of neighbours in numbers, the later one minus "
           "the earlier one ([] for fewer than two numbers).",
           "return [b - a for a, b in zip(numbers, numbers[1:])]", one(xs)),
  ]


def rotate_and_chunk(rng: Rng) -> list[Spec]:
  xs = [[1, 2, 3, 4, 5]] + rng.lists(4, 0, 7, 0, 9) + [[7]]
  out = []
  for k in (1, 2, 3):
    out.append(Spec(f"rotate_left_{k}(items: list[int]) -> list[int]",
                    f"Return items rotated left by {k} places: the first {k} items move to the "
                    f"end, in order. A list shorter than {k} rotates by {k} modulo its length; "
                    "an empty list stays empty.",
                    f"""
                    if not items:
                        return []
                    k = {k} % len(items)
                    return items[k:] + items[:k]
                    """, one(xs)))
  for k in (2, 3):
    out.append(Spec(f"chunks_of_{k}(items: list[int]) -> list[list[int]]",
                    f"Split items into consecutive chunks of {k} items; the last chunk may be "
                    "shorter.",
                    f"return [items[i:i + {k}] for i in range(0, len(items), {k})]", one(xs)))
  return out


def order_statistics(rng: Rng) -> list[Spec]:
  xs = [[4, 1, 7, 7, 3]] + rng.lists(5, 1, 8, -10, 10)
  return [
      Spec("second_largest(numbers: list[int]) -> int | None",
           "Return the second largest distinct value in numbers, or None if numbers has fewer "
           "than two distinct values.",
           """
           values = sorted(set(numbers))
           return values[-2] if len(values) >= 2 else None
           """, one(xs + [[5, 5]])),
      Spec("top_three(numbers: list[int]) -> list[int]",
           "Return the three largest items of numbers (repeats kept) in descending order, or "
           "all of them if there are fewer than three.",
           "return sorted(numbers, reverse=True)[:3]", one(xs + [[2]])),
      Spec("lower_median(numbers: list[int]) -> int",
           "Return the median of the non-empty list numbers; for an even length, the smaller of "
           "the two middle values.",
           "return sorted(numbers)[(len(numbers) - 1) // 2]", one(xs)),
      Spec("second_smallest(numbers: list[int]) -> int",
           "Return the second item of numbers in ascending order, repeats counted (numbers has "
           "at least two items).",
           "return sorted(numbers)[1]", one([x for x in xs if len(x) >= 2] + [[3, 3, 9]])),
  ]


def duplicates(rng: Rng) -> list[Spec]:
  xs = [[3, 1, 3, 2, 1]] + rng.lists(5, 0, 9, 0, 6) + [[1, 2, 3]]
  return [
      Spec("unique_in_order(items: list[int]) -> list[int]",
           "Return items without repeats, keeping the first occurrence of each value, in order.",
           """
           seen = set()
           out = []
           for x in items:
               if x not in seen:
                   seen.add(x)
                   out.append(x)
           return out
           """, one(xs)),
      Spec("repeated_values(items: list[int]) -> list[int]",
           "Return the values that occur more than once in items, each once, in the order of "
           "their first occurrence.",
           """
           out = []
           for i, x in enumerate(items):
               if items.count(x) > 1 and x not in items[:i]:
                   out.append(x)
           return out
           """, one(xs)),
      Spec("count_distinct(items: list[int]) -> int",
           "Return how many different values items holds.",
           "return len(set(items))", one(xs)),
      Spec("all_distinct(items: list[int]) -> bool",
           "Return True if no value occurs twice in items.",
           "return len(set(items)) == len(items)", one(xs + [[], [4, 2]])),
  ]


def windows(rng: Rng) -> list[Spec]:
  xs = [[1, 2, 3, 4, 5]] + rng.lists(5, 0, 9, -10, 10)
  out = [Spec(f"window_sums_{k}(numbers: list[int]) -> list[int]",
              f"Return the sums of every run of {k} consecutive numbers, in order ([] when there "
              f"are fewer than {k} numbers).",
              f"return [sum(numbers[i:i + {k}]) for i in range(len(numbers) - {k} + 1)]", one(xs))
         for k in (2, 3)]
  return out + [
      Spec("max_window_sum_3(numbers: list[int]) -> int",
           "Return the largest sum of 3 consecutive items of numbers, which has at least 3.",
           "return max(sum(numbers[i:i + 3]) for i in range(len(numbers) - 2))",
           one([x for x in xs if len(x) >= 3] + [[-5, -1, -2, -8], [7, 7, 7], [2, -8, 3, 3]])),
      Spec("count_rises(numbers: list[int]) -> int",
           "Return how many items of numbers are greater than the item just before them.",
           "return sum(1 for a, b in zip(numbers, numbers[1:]) if b > a)", one(xs)),
  ]


def search(rng: Rng) -> list[Spec]:
  xs = [[4, 8, 15, 16, 23, 42]] + rng.lists(5, 0, 8, 0, 20)
  sorted_lists = [sorted(set(rng.ints(rng.int(0, 10), -30, 30))) for _ in range(5)]
  searches = [([1, 3, 5, 7, 9], 7), ([1, 3, 5, 7, 9], 4), ([], 1)]
  for s in sorted_lists:
    searches.append((s, rng.choice(s) if s and rng.int(0, 2) else rng.int(-30, 30)))
  return [
      Spec("first_index_above_10(numbers: list[int]) -> int",
           "Return the index of the first number in numbers greater than 10, or -1 if there is "
           "none.",
           """
           for i, x in enumerate(numbers):
               if x > 10:
                   return i
           return -1
           """, one(xs + [[10, 3]])),
      Spec("last_index_of(items: list[int], target: int) -> int",
           "Return the index of the last occurrence of target in items, or -1 if it does not "
           "occur.",
           """
           for i in range(len(items) - 1, -1, -1):
               if items[i] == target:
                   return i
           return -1
           """, (([1, 2, 1, 3], 1), ([5], 6)) + tuple((x, rng.int(0, 20)) for x in xs)),
      Spec("binary_search(sorted_numbers: list[int], target: int) -> int",
           "Return the index of target in sorted_numbers, an ascending list of distinct "
           "integers, or -1 if it is absent.",
           """
           lo, hi = 0, len(sorted_numbers) - 1
           while lo <= hi:
               mid = (lo + hi) // 2
               if sorted_numbers[mid] == target:
                   return mid
               if sorted_numbers[mid] < target:
                   lo = mid + 1
               else:
                   hi = mid - 1
           return -1
           """, tuple(searches)),
      Spec("count_occurrences(items: list[int], target: int) -> int",
           "Return how many items of items equal target.",
           "return sum(1 for x in items if x == target)",
           (([1, 2, 1, 3, 1], 1),) + tuple((x, rng.choice(x) if x else 0) for x in xs)),
  ]


def combine(rng: Rng) -> list[Spec]:
  pairs = [([1, 2, 3], [10, 20])] + [(rng.ints(rng.int(0, 5), 0, 9), rng.ints(rng.int(0, 5), 0, 9))
                                     for _ in range(5)]
  same = [([1, 2, 3], [4, 5, 6])] + [tuple(rng.lists(2, n, n, -9, 9)) for n in rng.ints(5, 0, 6)]
  sorted_pairs = [(sorted(a), sorted(b)) for a, b in pairs]
  return [
      Spec("interleave_lists(a: list[int], b: list[int]) -> list[int]",
           "Return the items of a and b alternately, starting with a; the rest of the longer "
           "list follows at the end.",
           """
           out = []
           for i in range(max(len(a), len(b))):
               if i < len(a):
                   out.append(a[i])
               if i < len(b):
                   out.append(b[i])
           return out
           """, tuple(pairs)),
      Spec("pairwise_sums(a: list[int], b: list[int]) -> list[int]",
           "Return the element-wise sums of a and b, two lists of the same length.",
           "return [x + y for x, y in zip(a, b)]", tuple(same)),
      Spec("merge_sorted(a: list[int], b: list[int]) -> list[int]",
           "Merge the ascending lists a and b into one ascending list.",
           """
           out, i, j = [], 0, 0
           while i < len(a) and j < len(b):
               if a[i] <= b[j]:
                   out.append(a[i])
                   i += 1
               else:
                   out.append(b[j])
                   j += 1
           return out + a[i:] + b[j:]
           """, tuple(sorted_pairs)),
      Spec("flatten_once(nested: list[list[int]]) -> list[int]",
           "Return the items of the inner lists of nested, in order, as one list.",
           "return [x for inner in nested for x in inner]",
           one([[[1, 2], [], [3]]] + [rng.lists(rng.int(0, 4), 0, 3, 0, 9) for _ in range(5)])),
      Spec("dot_product(a: list[int], b: list[int]) -> int",
           "Return the sum of the products of the items of a and b at equal indices; a and b "
           "have the same length.",
           "return sum(x * y for x, y in zip(a, b))", tuple(same)),
  ]


def runs(rng: Rng) -> list[Spec]:
  xs = [[1, 2, 5, 3, 4, 6, 7, 2]] + rng.lists(5, 1, 10, -5, 5)
  return [
      Spec("max_subarray_sum(numbers: list[int]) -> int",
           "Return the largest sum of a non-empty run of consecutive items of numbers, which is "
           "not empty.",
           """
           best = current = numbers[0]
           for x in numbers[1:]:
               current = max(x, current + x)
               best = max(best, current)
           return best
           """, one(xs + [[-3, -1, -2]])),
      Spec("longest_increasing_run(numbers: list[int]) -> int",
           "Return the length of the longest run of consecutive items of numbers in which each "
           "item is greater than the one before it (0 for an empty list).",
           """
           if not numbers:
               return 0
           best = run = 1
           for prev, x in zip(numbers, numbers[1:]):
               run = run + 1 if x > prev else 1
               best = max(best, run)
           return best
           """, one(xs + [[]])),
      Spec("longest_equal_run(items: list[int]) -> int",
           "Return the length of the longest run of consecutive equal items (0 for an empty "
           "list).",
           """
           best = run = 0
           for i, x in enumerate(items):
               run = run + 1 if i > 0 and items[i - 1] == x else 1
               best = max(best, run)
           return best
           """, one([[1, 1, 2, 2, 2, 3]] + rng.lists(5, 0, 10, 0, 2))),
      Spec("count_inversions(numbers: list[int]) -> int",
           "Return how many pairs of indices i < j have numbers[i] > numbers[j].",
           """
           count = 0
           for i in range(len(numbers)):
               for j in range(i + 1, len(numbers)):
                   if numbers[i] > numbers[j]:
                       count += 1
           return count
           """, one(xs)),
  ]


def matrices(rng: Rng) -> list[Spec]:
  rect = [[[1, 2, 3], [4, 5, 6]]] + [rng.lists(r, c, c, -9, 9) for r, c in
                                     ((rng.int(1, 4), rng.int(1, 4)) for _ in range(4))]
  square = [[[1, 2], [3, 4]]] + [rng.lists(n, n, n, -9, 9) for n in rng.ints(4, 1, 4)]
  ident = [[[1, 0], [0, 1]], [[1]], [[1, 0], [1, 1]], [[0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
           [[1, 0, 0], [0, 1, 0], [0, 0, 2]]] + [rng.lists(2, 2, 2, 0, 1)]
  return [
      Spec("transpose(matrix: list[list[int]]) -> list[list[int]]",
           "Return the transpose of a rectangular matrix given as a non-empty list of non-empty "
           "rows.",
           "return [list(column) for column in zip(*matrix)]", one(rect)),
      Spec("diagonal_sum(matrix: list[list[int]]) -> int",
           "Return the sum of the main diagonal (top left to bottom right) of a square matrix "
           "given as a list of rows.",
           "return sum(matrix[i][i] for i in range(len(matrix)))", one(square)),
      Spec("row_sums(matrix: list[list[int]]) -> list[int]",
           "Return the sum of each row of matrix, a list of rows.",
           "return [sum(row) for row in matrix]", one(rect)),
      Spec("rotate_clockwise(matrix: list[list[int]]) -> list[list[int]]",
           "Return the square matrix (a list of rows) rotated 90 degrees clockwise.",
           "return [list(row) for row in zip(*matrix[::-1])]", one(square)),
      Spec("is_identity(matrix: list[list[int]]) -> bool",
           "Return True if the square matrix (a list of rows) has 1 on its main diagonal and 0 "
           "everywhere else.",
           """
           n = len(matrix)
           return all(matrix[i][j] == (1 if i == j else 0) for i in range(n) for j in range(n))
           """, one(ident)),
  ]


def frequencies(rng: Rng) -> list[Spec]:
  xs = [[3, 1, 3, 2, 1, 3]] + rng.lists(5, 1, 9, 0, 5)
  return [
      Spec("mode(numbers: list[int]) -> int",
           "Return the most frequent value in the non-empty list numbers; on a tie, the "
           "smallest of the most frequent values.",
           """
           best = None
           for x in sorted(set(numbers)):
               if best is None or numbers.count(x) > numbers.count(best):
                   best = x
           return best
           """, one(xs + [[2, 1]])),
      Spec("max_frequency(numbers: list[int]) -> int",
           "Return how many times the most frequent value of numbers occurs (0 for an empty "
           "list).",
           "return max((numbers.count(x) for x in numbers), default=0)", one(xs + [[]])),
      Spec("singletons(numbers: list[int]) -> list[int]",
           "Return the values that occur exactly once in numbers, in their original order.",
           "return [x for x in numbers if numbers.count(x) == 1]", one(xs)),
      Spec("majority(numbers: list[int]) -> int | None",
           "Return the value that occurs more than len(numbers) // 2 times in numbers, or None "
           "if there is no such value.",
           """
           for x in numbers:
               if numbers.count(x) > len(numbers) // 2:
                   return x
           return None
           """, one(xs + [[2, 2, 1], [1, 2], [4]])),
  ]


FAMILIES = (filters, thresholds, running, rotate_and_chunk, order_statistics, duplicates,
            windows, search, combine, runs, matrices, frequencies)
