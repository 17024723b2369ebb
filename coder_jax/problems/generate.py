"""Writes the built-in problem set (data/problems.jsonl next to this file) from the families.

    python -m coder_jax.problems.generate [--out PATH] [--check]

The output is the same bytes on every machine: families draw from their own LCG rather than
`random` (whose algorithms may change between versions), and nothing depends on hash order.
tests/test_problems.py regenerates the file and compares. Expected outputs come from running each canonical body in this process, which is
safe because it is our own code, never a model's; each problem is checked as it is made (see
`make_record`), so a family with a weak test fails here rather than rewarding wrong programs.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import keyword
import sys
import textwrap
import zlib

from coder_jax.files import write_atomic
from coder_jax.problems.families import FAMILIES
from coder_jax.problems.families.spec import Rng, Spec
from coder_jax.problems.problem import default_path

# Whole families are held out, not single problems: siblings differ only in a constant, so a
# held-out sibling would measure recall of its family rather than generalisation. One or two
# per kind of data, about a fifth of the problems.
HELDOUT_FAMILIES = frozenset({"two_term_sequence", "powers", "caesar", "run_length", "letters",
                              "windows", "matrices", "frequencies", "merging", "coins",
                              "calendar"})
MIN_TESTS = 5


def _outputs(source: str, entry_point: str, inputs) -> list:
  namespace: dict = {}
  exec(compile(source, f"<{entry_point}>", "exec"), namespace)  # our own code, not a model's
  # Deep copies: a body that mutates its argument must not change the next call's input.
  return [namespace[entry_point](*copy.deepcopy(args)) for args in inputs]


def _literal(value) -> str:
  """repr(value), which the test file embeds; it must read back as the same value."""
  text = repr(value)
  if repr(ast.literal_eval(text)) != text:
    raise ValueError(f"{text} does not read back as a literal")
  return text


def _prompt(spec: Spec, args: tuple, out) -> str:
  doc = textwrap.fill(spec.doc, width=92, initial_indent='    """', subsequent_indent="    ")
  call = f"{spec.entry_point}({', '.join(_literal(a) for a in args)})"
  example = f"    >>> {call}\n    {_literal(out)}\n"
  if "\\" in example or '"""' in example:  # an escape would change meaning inside the docstring
    raise ValueError(f"example {call} needs an escape inside the docstring")
  return f"def {spec.signature}:\n{doc}\n\n{example}" + '    """\n'


def make_record(task_id: str, spec: Spec, split: str) -> dict:
  """One problem, checked: at least MIN_TESTS distinct inputs; outputs that are plain literals,
  not all equal (a constant body must fail) and not all the first argument (nor must an
  identity); a body fully indented (a completion ends at the first unindented line)."""
  entry = spec.entry_point
  if not entry.isidentifier() or keyword.iskeyword(entry):
    raise ValueError(f"{task_id}: entry point {entry!r} is not a name")
  body = spec.body_lines()
  if any(line and not line.startswith("    ") or "\t" in line for line in body.splitlines()):
    raise ValueError(f"{task_id} {entry}: body lines must be indented by spaces")
  inputs, seen = [], set()
  for args in spec.inputs:
    key = repr(args)
    if key not in seen:  # random draws may repeat a fixed case
      seen.add(key)
      inputs.append(tuple(args))
  if len(inputs) < MIN_TESTS:
    raise ValueError(f"{task_id} {entry}: {len(inputs)} distinct inputs, need {MIN_TESTS}")
  header = f"def {spec.signature}:\n"
  outputs = _outputs(header + body, entry, inputs)
  if len({repr(o) for o in outputs}) < 2:
    raise ValueError(f"{task_id} {entry}: every output is {outputs[0]!r}; a constant passes")
  if all(args and repr(o) == repr(args[0]) for args, o in zip(inputs, outputs)):
    raise ValueError(f"{task_id} {entry}: every output is its input; an identity passes")
  prompt = _prompt(spec, inputs[0], outputs[0])
  if [repr(o) for o in _outputs(prompt + body, entry, inputs)] != [repr(o) for o in outputs]:
    raise ValueError(f"{task_id} {entry}: the docstring changed the function")
  asserts = "".join(f"    assert candidate({', '.join(_literal(a) for a in args)}) == "
                    f"{_literal(o)}\n" for args, o in zip(inputs, outputs))
  return {"task_id": task_id, "prompt": prompt, "entry_point": entry, "canonical_solution": body,
          "tests": "def check(candidate):\n" + asserts, "split": split}


def build_records() -> list[dict]:
  names = [f.__name__ for f in FAMILIES]
  unknown = HELDOUT_FAMILIES - set(names)
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"family names: unknown held-out {sorted(unknown)} or a repeated name")
  records, prompts = [], set()
  for family in FAMILIES:
    rng = Rng(zlib.crc32(family.__name__.encode()))
    split = "heldout" if family.__name__ in HELDOUT_FAMILIES else "train"
    for spec in family(rng):
      record = make_record(f"cj/{len(records)}", spec, split)
      if record["prompt"] in prompts:
        raise ValueError(f"{record['task_id']}: the same prompt as an earlier problem")
      prompts.add(record["prompt"])
      records.append(record)
  heldout = sum(r["split"] == "heldout" for r in records) / len(records)
  if not 0.15 <= heldout <= 0.25:
    raise ValueError(f"held-out fraction {heldout:.2f}, want about 0.2")
  return records


def render(records: list[dict]) -> bytes:
  return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records).encode("ascii")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m coder_jax.problems.generate",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=default_path(),
                      help="where to write (default: the shipped file)")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if --out differs from what would be written")
  args = parser.parse_args(argv)
  records = build_records()
  data = render(records)
  if args.check:
    try:
      with open(args.out, "rb") as fh:
        same = fh.read() == data
    except OSError as e:
      print(f"generate: cannot read {args.out}: {e}", file=sys.stderr)
      return 1
    print(f"{args.out}: {'up to date' if same else 'differs from the generator'}")
    return 0 if same else 1
  write_atomic(args.out, data)  # a reader never sees half a file
  print(f"wrote {len(records)} problems to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
