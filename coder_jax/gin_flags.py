"""Parsing the gin files and bindings of a command line, with the mistakes a user makes turned
into one-line errors that name the flag: a missing file, a syntax error, a value of the wrong
type for a configurable's annotated parameter, and a bound macro that nothing reads (a typo such
as `--gin.TRAIN_STEP=5` would otherwise be ignored)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import tokenize
import types
import typing

import gin
from gin import config as gin_config


def parse(gin_files, bindings, search_paths=()):
  """gin.parse_config_files_and_bindings, then the checks above."""
  search_paths = [p for p in search_paths if p]
  for f in gin_files:   # checked here: gin would also log each miss as an error first
    if not any(os.path.isfile(os.path.join(p, f)) for p in ["", *search_paths]):
      raise FileNotFoundError(f"--gin_file: {f}: no such file (searched the current directory "
                              f"and {', '.join(search_paths) or 'no search paths'})")
  for p in search_paths:
    gin.add_config_file_search_path(p)
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings)
  except SyntaxError as e:
    where = f"{e.filename}:{e.lineno}" if e.filename else "--gin binding"
    raise ValueError(f"gin: syntax error at {where}: {e.msg}"
                     + (f" in {e.text.strip()!r}" if e.text else "")) from None
  except tokenize.TokenError as e:
    raise ValueError(f"gin: syntax error: {e.args[0]} (an unclosed bracket or quote?)") from None
  except OSError as e:
    raise FileNotFoundError(f"--gin_file: {' '.join(str(e).split())}") from None
  except ValueError as e:   # gin's messages span lines: what, then where
    raise ValueError("gin: " + "; ".join(l.strip() for l in str(e).splitlines() if l.strip())
                     ) from None
  check_macros_used()
  check_types()


def _macro_name(ref) -> str:
  return ref.scoped_selector.rsplit("/", 1)[0]


def check_macros_used():
  """Every macro that is bound is read by some binding (directly or through another macro)."""
  macro = gin.get_configurable(gin_config.macro)
  bound = {scope for scope, selector in gin_config._CONFIG if selector == "gin.macro" and scope}
  read = {_macro_name(r) for r in gin_config.iterate_references(gin_config._CONFIG, to=macro)}
  unused = sorted(bound - read)
  if unused:
    raise ValueError(f"gin: macro {unused[0]} is bound but nothing reads it (a typo? "
                     "macros read here: " + ", ".join(sorted(read)) + ")")


def _resolve(value, via=()):
  """The value a binding receives, following macro references; (value, macro names)."""
  while (isinstance(value, gin_config.ConfigurableReference)
         and value.configurable.wrapped is gin_config.macro):
    name = _macro_name(value)
    via = via + (name,)
    value = gin_config._CONFIG.get((name, "gin.macro"), {}).get("value", _UNSET)
  return value, via


_UNSET = object()


def _accepts(hint, value) -> bool | None:
  """Whether `value` fits the annotation `hint`; None when the hint is not a simple one."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    results = [_accepts(h, value) for h in typing.get_args(hint)]
    if any(r is True for r in results):
      return True
    return None if any(r is None for r in results) else False
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if hint is tuple or origin is tuple:
    return isinstance(value, (tuple, list))
  return None


def _hints(fn) -> dict:
  target = fn if inspect.isclass(fn) and dataclasses.is_dataclass(fn) else (
      fn.__init__ if inspect.isclass(fn) else fn)
  try:
    return typing.get_type_hints(target)
  except Exception:  # noqa: BLE001 -- an annotation we cannot evaluate is simply not checked
    return {}


def check_types():
  """Each bound value fits its parameter's annotation (int, float, str, bool, tuple, Optional)."""
  for (scope, selector), params in gin_config._CONFIG.items():
    if selector.startswith("gin."):
      continue
    configurable = gin_config._REGISTRY.get_match(selector)
    if configurable is None:
      continue
    hints = _hints(configurable.wrapped)
    if configurable.name == "model_config":   # get_config(preset, **fields of ModelConfig)
      from coder_jax.model.config import ModelConfig
      hints = {**_hints(ModelConfig), **hints}
    for name, raw in params.items():
      if name not in hints:
        continue
      value, via = _resolve(raw)
      if value is _UNSET or isinstance(value, gin_config.ConfigurableReference):
        continue
      if _accepts(hints[name], value) is False:
        key = f"{scope + '/' if scope else ''}{configurable.name}.{name}"
        through = f" (set through macro {via[-1]})" if via else ""
        expected = getattr(hints[name], "__name__", None) or str(hints[name])
        raise ValueError(f"gin: {key} = {value!r}{through}: expected {expected}, got "
                         f"{type(value).__name__}")
