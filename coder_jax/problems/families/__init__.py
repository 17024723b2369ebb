"""The families the built-in problem set is generated from, in the order the set lists them."""

from coder_jax.problems.families import algorithms, chars, dicts, lists, numbers, words

FAMILIES = (numbers.FAMILIES + chars.FAMILIES + words.FAMILIES + lists.FAMILIES + dicts.FAMILIES
            + algorithms.FAMILIES)
