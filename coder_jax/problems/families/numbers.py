"""Problem families over integers: arithmetic, digits, divisors, primes, sequences."""

from __future__ import annotations

from coder_jax.problems.families.spec import Rng, Spec, one, signed


def add_constant(rng: Rng) -> list[Spec]:
  return [Spec(f"add_{k}(x: int) -> int", f"Return x plus {k}.", f"return x + {k}",
               one(rng.ints(6, -50, 50))) for k in (3, 7, 12, 25, 100)]


def scale_and_shift(rng: Rng) -> list[Spec]:
  out = []
  for a, b in ((2, 1), (3, -4), (5, 2), (-2, 7), (10, -3)):
    expr = f"{a} * x {signed(b, '')}"
    out.append(Spec("scale_and_shift(x: int) -> int", f"Return {expr}.", f"return {expr}",
                    one(rng.ints(6, -30, 30))))
  return out


def digit_sum_in_base(rng: Rng) -> list[Spec]:
  return [Spec(f"digit_sum_base_{b}(n: int) -> int",
               f"Return the sum of the digits of the non-negative integer n written in base {b}.",
               f"""
               total = 0
               while n > 0:
                   total += n % {b}
                   n //= {b}
               return total
               """, one(rng.ints(4, 1, 5000) + [0])) for b in (10, 2, 3, 8, 16)]


def sum_of_multiples(rng: Rng) -> list[Spec]:
  return [Spec("sum_of_multiples(n: int) -> int",
               f"Return the sum of the positive integers below n that are multiples of {a} or "
               f"of {b} (or of both).",
               f"return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)",
               one(rng.ints(5, 2, 200) + [1]))
          for a, b in ((3, 5), (2, 7), (4, 6), (5, 11), (3, 8))]


def to_base(rng: Rng) -> list[Spec]:
  out = []
  for b in (2, 3, 5, 7, 16):
    letters = "; digits above 9 are the lowercase letters a-f" if b > 10 else ""
    out.append(Spec(
        f"to_base_{b}(n: int) -> str",
        f"Return the non-negative integer n written in base {b}, without a prefix or leading "
        f"zeros ('0' for 0){letters}.",
        f"""
        digits = "0123456789abcdef"
        if n == 0:
            return "0"
        out = ""
        while n > 0:
            out = digits[n % {b}] + out
            n //= {b}
        return out
        """, one(rng.ints(4, 1, 3000) + [0, b])))
  return out


def polygonal_number(rng: Rng) -> list[Spec]:
  out = []
  for k, name in ((3, "triangular"), (4, "square"), (5, "pentagonal"), (6, "hexagonal"),
                  (8, "octagonal")):
    linear = "" if k == 4 else " " + signed(-(k - 4), "n")
    out.append(Spec(
        f"{name}_number(n: int) -> int",
        f"Return the n-th {name} number, for n >= 1. The n-th k-gonal number is "
        f"((k - 2) * n * n - (k - 4) * n) // 2, and here k is {k}.",
        f"return ({k - 2} * n * n{linear}) // 2", one(rng.ints(5, 2, 40) + [1])))
  return out


def clamp(rng: Rng) -> list[Spec]:
  return [Spec("clamp(x: int) -> int",
               f"Return x limited to the range [{lo}, {hi}]: {lo} when x is below it, {hi} when "
               "x is above it, else x itself.",
               f"return max({lo}, min({hi}, x))",
               one(rng.ints(4, lo - 20, hi + 20) + [lo - 1, hi + 1]))
          for lo, hi in ((0, 10), (-5, 5), (1, 100), (-20, -10), (3, 4))]


def divisors(rng: Rng) -> list[Spec]:
  xs = rng.ints(5, 2, 500)
  return [
      Spec("count_divisors(n: int) -> int",
           "Return how many positive integers divide n, for n >= 1.",
           "return sum(1 for d in range(1, n + 1) if n % d == 0)", one(xs + [1, 360])),
      Spec("sum_proper_divisors(n: int) -> int",
           "Return the sum of the positive divisors of n that are smaller than n, for n >= 1 "
           "(so 1 gives 0).",
           "return sum(d for d in range(1, n) if n % d == 0)", one(xs[::-1] + [1, 12])),
      Spec("largest_proper_divisor(n: int) -> int",
           "Return the largest divisor of n that is smaller than n, for n >= 2 (1 for a prime).",
           """
           for d in range(n // 2, 0, -1):
               if n % d == 0:
                   return d
           """, one(rng.ints(4, 2, 500) + [2, 97])),
      Spec("smallest_prime_factor(n: int) -> int",
           "Return the smallest prime that divides n, for n >= 2.",
           """
           d = 2
           while d * d <= n:
               if n % d == 0:
                   return d
               d += 1
           return n
           """, one(rng.ints(4, 2, 1000) + [2, 91, 97])),
      Spec("is_perfect(n: int) -> bool",
           "Return True if n (n >= 1) equals the sum of its positive divisors smaller than "
           "itself.",
           "return n == sum(d for d in range(1, n) if n % d == 0)",
           one([6, 1, 28, 496] + rng.ints(3, 2, 500))),
  ]


def primes(rng: Rng) -> list[Spec]:
  return [
      Spec("is_prime(n: int) -> bool",
           "Return True if n is a prime number; numbers below 2 are not prime.",
           """
           if n < 2:
               return False
           d = 2
           while d * d <= n:
               if n % d == 0:
                   return False
               d += 1
           return True
           """, one([97, 1, 2, -7, 0, 91] + rng.ints(3, 2, 300))),
      Spec("count_primes_below(n: int) -> int",
           "Return how many prime numbers are smaller than n.",
           """
           count = 0
           for k in range(2, n):
               if all(k % d for d in range(2, int(k ** 0.5) + 1)):
                   count += 1
           return count
           """, one([10, 0, 2, 3] + rng.ints(3, 4, 500))),
      Spec("next_prime(n: int) -> int",
           "Return the smallest prime number strictly greater than n.",
           """
           k = n + 1
           while k < 2 or any(k % d == 0 for d in range(2, int(k ** 0.5) + 1)):
               k += 1
           return k
           """, one([10, -5, 2, 13] + rng.ints(3, 0, 1000))),
      Spec("nth_prime(n: int) -> int",
           "Return the n-th prime number, counting from 1 (the first prime is 2).",
           """
           count, k = 0, 1
           while count < n:
               k += 1
               if all(k % d for d in range(2, int(k ** 0.5) + 1)):
                   count += 1
           return k
           """, one([5, 1, 2] + rng.ints(3, 3, 150))),
      Spec("prime_factors(n: int) -> list[int]",
           "Return the prime factors of n (n >= 2) in non-decreasing order, each repeated as "
           "often as it divides n.",
           """
           factors = []
           d = 2
           while d * d <= n:
               while n % d == 0:
                   factors.append(d)
                   n //= d
               d += 1
           if n > 1:
               factors.append(n)
           return factors
           """, one([60, 2, 97, 1024] + rng.ints(3, 2, 5000))),
  ]


def fizz_word(rng: Rng) -> list[Spec]:
  out = []
  for a, b, wa, wb, both in ((3, 5, "Fizz", "Buzz", 15), (2, 7, "Foo", "Bar", 14),
                             (4, 6, "Ping", "Pong", 12), (3, 7, "Tick", "Tock", 21),
                             (5, 9, "Zip", "Zap", 45)):
    out.append(Spec(
        "fizz_word(n: int) -> str",
        f"Return '{wa}{wb}' if n is divisible by both {a} and {b}, '{wa}' if only by {a}, "
        f"'{wb}' if only by {b}, and otherwise n written in decimal.",
        f"""
        if n % {a} == 0 and n % {b} == 0:
            return "{wa}{wb}"
        if n % {a} == 0:
            return "{wa}"
        if n % {b} == 0:
            return "{wb}"
        return str(n)
        """, one([both, a, b, 1, 2 * both] + rng.ints(3, 1, 100))))
  return out


def two_term_sequence(rng: Rng) -> list[Spec]:
  return [Spec("sequence_term(n: int) -> int",
               f"A sequence starts {a}, {b}, and every later term is the sum of the two terms "
               f"before it. Return the term at index n >= 0, where index 0 is {a}.",
               f"""
               a, b = {a}, {b}
               for _ in range(n):
                   a, b = b, a + b
               return a
               """, one([6, 0, 1] + rng.ints(3, 2, 40)))
          for a, b in ((0, 1), (2, 1), (1, 3), (3, -1), (5, 2))]


_COLLATZ = ("Starting from n >= 1, repeatedly replace n by n // 2 if it is even, or by 3 * n + 1 "
            "if it is odd, until it reaches 1.")


def collatz(rng: Rng) -> list[Spec]:
  xs = [6, 1, 27] + rng.ints(3, 2, 200)
  return [
      Spec("collatz_steps(n: int) -> int", f"{_COLLATZ} Return how many replacements it takes.",
           """
           steps = 0
           while n != 1:
               n = n // 2 if n % 2 == 0 else 3 * n + 1
               steps += 1
           return steps
           """, one(xs)),
      Spec("collatz_peak(n: int) -> int",
           f"{_COLLATZ} Return the largest value reached, n itself included.",
           """
           peak = n
           while n != 1:
               n = n // 2 if n % 2 == 0 else 3 * n + 1
               peak = max(peak, n)
           return peak
           """, one(xs)),
      Spec("collatz_odd_count(n: int) -> int",
           f"{_COLLATZ} Return how many of the values from n to 1, both included, are odd.",
           """
           count = 0
           while True:
               if n % 2 == 1:
                   count += 1
               if n == 1:
                   return count
               n = n // 2 if n % 2 == 0 else 3 * n + 1
           """, one(xs)),
  ]


def gcd_lcm(rng: Rng) -> list[Spec]:
  lists = [[g * rng.int(1, 12) for _ in range(rng.int(2, 5))]
           for g in [6] + rng.ints(4, 1, 20)]
  fractions = [(6, 8), (0, 5), (3, -9)] + [(rng.int(-60, 60), rng.choice([-1, 1]) * rng.int(1, 30))
                                           for _ in range(3)]
  return [
      Spec("gcd_of_list(numbers: list[int]) -> int",
           "Return the greatest common divisor of a non-empty list of positive integers.",
           """
           from math import gcd
           result = 0
           for x in numbers:
               result = gcd(result, x)
           return result
           """, one(lists)),
      Spec("lcm_of_list(numbers: list[int]) -> int",
           "Return the least common multiple of a non-empty list of positive integers.",
           """
           from math import gcd
           result = 1
           for x in numbers:
               result = result * x // gcd(result, x)
           return result
           """, one(lists)),
      Spec("reduce_fraction(num: int, den: int) -> tuple[int, int]",
           "Return the fraction num / den (den != 0) in lowest terms as a tuple (numerator, "
           "denominator) whose denominator is positive.",
           """
           from math import gcd
           g = gcd(num, den)
           num, den = num // g, den // g
           if den < 0:
               num, den = -num, -den
           return (num, den)
           """, tuple(fractions)),
      Spec("are_coprime(a: int, b: int) -> bool",
           "Return True if the positive integers a and b have no common divisor greater than 1.",
           """
           while b:
               a, b = b, a % b
           return a == 1
           """, ((8, 15), (12, 18), (1, 1), (7, 7), (9, 28),
                 (rng.int(1, 100), rng.int(1, 100)), (rng.int(1, 100), rng.int(1, 100)))),
  ]


def round_to_multiple(rng: Rng) -> list[Spec]:
  return [Spec(f"round_to_{m}(x: int) -> int",
               f"Round x to the nearest multiple of {m}; a value exactly halfway between two "
               "multiples rounds up (toward positive infinity).",
               f"return (x + {m // 2}) // {m} * {m}",
               one(rng.ints(5, -100, 100) + [m // 2, -(m // 2)])) for m in (5, 10, 3, 25, 4)]


def powers(rng: Rng) -> list[Spec]:
  out = [
      Spec("isqrt(n: int) -> int", "Return the largest integer r with r * r <= n, for n >= 0.",
           """
           r = 0
           while (r + 1) * (r + 1) <= n:
               r += 1
           return r
           """, one([17, 0, 1, 16] + rng.ints(3, 2, 10000))),
      Spec("is_perfect_square(n: int) -> bool",
           "Return True if n is the square of an integer; negative numbers are not squares.",
           """
           if n < 0:
               return False
           r = 0
           while r * r < n:
               r += 1
           return r * r == n
           """, one([49, 50, 0, -4, rng.int(2, 90) ** 2] + rng.ints(2, 2, 2000))),
  ]
  for k in (2, 3, 10):
    out.append(Spec(f"is_power_of_{k}(n: int) -> bool",
                    f"Return True if n equals {k} ** e for some integer e >= 0 (so 1 is a power "
                    f"of {k}).",
                    f"""
                    if n < 1:
                        return False
                    while n % {k} == 0:
                        n //= {k}
                    return n == 1
                    """, one([k ** 3, 1, 0, k ** 5, k * k + 1, 2 * k] + rng.ints(2, 1, 1000))))
  return out


def _roman(n: int) -> str:
  # Inputs for from_roman; the problem's own solution is independent code.
  out = ""
  for value, symbol in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                        (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"),
                        (1, "I")):
    out += symbol * (n // value)
    n %= value
  return out


def roman_numerals(rng: Rng) -> list[Spec]:
  xs = [1994, 4, 9, 3999] + rng.ints(3, 1, 3999)
  return [
      Spec("to_roman(n: int) -> str",
           "Return n (1 <= n <= 3999) as a Roman numeral in standard subtractive form, where 4 is "
           "'IV' and 900 is 'CM'.",
           """
           values = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                     (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
           out = ""
           for value, symbol in values:
               while n >= value:
                   out += symbol
                   n -= value
           return out
           """, one(xs)),
      Spec("from_roman(s: str) -> int",
           "Return the value of the Roman numeral s, written in standard subtractive form "
           "(1 to 3999).",
           """
           values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
           total = 0
           for i, ch in enumerate(s):
               if i + 1 < len(s) and values[s[i + 1]] > values[ch]:
                   total -= values[ch]
               else:
                   total += values[ch]
           return total
           """, one([_roman(x) for x in xs])),
  ]


def digits(rng: Rng) -> list[Spec]:
  xs = rng.ints(4, 0, 99999)
  return [
      Spec("reverse_digits(n: int) -> int",
           "Return the number whose decimal digits are those of the non-negative integer n in "
           "reverse order; leading zeros are dropped, so 120 gives 21.",
           "return int(str(n)[::-1])", one([1234] + xs + [120, 0])),
      Spec("is_palindrome_number(n: int) -> bool",
           "Return True if the decimal digits of n read the same backwards; negative numbers "
           "are not palindromes.",
           "return n >= 0 and str(n) == str(n)[::-1]",
           one([121, -121, 10, 7, 1221] + xs[:2])),
      Spec("count_digits(n: int) -> int",
           "Return how many decimal digits n has, ignoring its sign (0 has one digit).",
           "return len(str(abs(n)))", one([-305] + xs + [0, 10 ** 12])),
      Spec("digital_root(n: int) -> int",
           "Replace the non-negative integer n by the sum of its decimal digits, again and "
           "again, until one digit remains; return that digit.",
           """
           while n >= 10:
               n = sum(int(d) for d in str(n))
           return n
           """, one([493193] + xs + [0, 9])),
      Spec("product_of_digits(n: int) -> int",
           "Return the product of the decimal digits of the non-negative integer n.",
           """
           product = 1
           for d in str(n):
               product *= int(d)
           return product
           """, one([234] + xs + [7, 105])),
  ]


FAMILIES = (add_constant, scale_and_shift, digit_sum_in_base, sum_of_multiples, to_base,
            polygonal_number, clamp, divisors, primes, fizz_word, two_term_sequence, collatz,
            gcd_lcm, round_to_multiple, powers, roman_numerals, digits)
