"""Named implementations of one op (attention, experts) that kernels can add to."""

from __future__ import annotations

from typing import Callable


class ImplRegistry:
  def __init__(self, field: str):
    self.field = field  # the ModelConfig field that picks an implementation
    self._impls: dict[str, Callable] = {}

  def register(self, name: str, fn: Callable) -> None:
    self._impls[name] = fn

  def get(self, name: str) -> Callable:
    if name not in self._impls:
      raise ValueError(f"{self.field}: unknown implementation {name!r}; "
                       f"registered: {', '.join(sorted(self._impls))}")
    return self._impls[name]
