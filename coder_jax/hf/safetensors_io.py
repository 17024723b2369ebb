"""Streaming safetensors reading and writing in plain numpy (bfloat16 through ml_dtypes).

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus optional "__metadata__"), then the raw little-endian tensor bytes. Reading memory-maps the
file so a tensor is read only when used; writing takes the header up front and then one tensor
at a time, so memory holds one tensor, never a shard.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  pass


def dtype_name(dtype) -> str:
  dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
  if dt not in _NAMES:
    raise SafetensorsError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dt]


def _check_entry(path: str, name: str, e, data_size: int) -> None:
  def bad(why):
    raise SafetensorsError(f"{path}: tensor {name!r} {why}")

  if not isinstance(e, dict):
    bad("has no dtype/shape/data_offsets entry")
  if e.get("dtype") not in _DTYPES:
    bad(f"has unsupported dtype {e.get('dtype')!r}")
  shape, offsets = e.get("shape"), e.get("data_offsets")
  if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
    bad(f"has an invalid shape {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2
          and all(isinstance(o, int) and o >= 0 for o in offsets)):
    bad(f"has invalid data_offsets {offsets!r}")
  want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
  if offsets[1] - offsets[0] != want or offsets[1] > data_size:
    bad("data is truncated or inconsistent with its shape")


class SafetensorsFile:
  """Lazy view of one .safetensors file: `f.keys()`, `f.shape(name)`, `f[name]` -> memmap."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      raw = fh.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > min(MAX_HEADER, size - 8):
        raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
      try:
        header = json.loads(fh.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: header must be a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = header
    for name, e in header.items():
      _check_entry(path, name, e, size - self._start)

  def keys(self):
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._entries[name]["dtype"]]

  def __getitem__(self, name: str) -> np.ndarray:
    e = self._entries[name]
    begin, _ = e["data_offsets"]
    shape = tuple(e["shape"])
    dt = _DTYPES[e["dtype"]]
    if int(np.prod(shape, dtype=np.int64)) == 0:
      return np.zeros(shape, dt)
    return np.memmap(self.path, dtype=dt, mode="r", offset=self._start + begin, shape=shape)


def write_file(path: str, entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> int:
  """Write a file whose tensors are `entries` (name, shape, dtype); `produce(name)` gives each
  tensor's data when its turn comes. Returns the bytes of tensor data written."""
  entries = list(entries)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in entries:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for name, shape, dtype in entries:
      arr = np.asarray(produce(name))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise SafetensorsError(f"{name}: produced {arr.shape} {arr.dtype}, "
                               f"planned {tuple(shape)} {np.dtype(dtype)}")
      fh.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
  return offset
