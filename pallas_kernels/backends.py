"""The backend rule every kernel's public function shares."""

from __future__ import annotations

import jax

BACKENDS = ("xla", "triton", "tpu")
_PLATFORM_BACKEND = {"gpu": "triton", "tpu": "tpu"}


def target_platform() -> str:
  """The platform the program being traced is compiled for: that of the devices of the mesh in
  context (a TPU topology's when compiling ahead of time on a machine without one), else jax's
  default backend. Kernel backends and interpret modes follow this, not the host."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_backend(op: str, backend: str | None, interpret) -> str:
  """The backend to run: None picks the target platform's kernel (Triton on GPU, Mosaic on TPU) or
  the XLA reference elsewhere. interpret=True runs a kernel on CPU, so it needs a kernel
  backend named explicitly."""
  if backend is None and interpret:
    raise ValueError(f"{op}: interpret=True needs a kernel backend: pass backend='triton' or "
                     "'tpu'")
  if backend is None:
    return _PLATFORM_BACKEND.get(target_platform(), "xla")
  if backend not in BACKENDS:
    raise ValueError(f"{op}: unknown backend {backend!r}; one of {BACKENDS}")
  if interpret and backend == "xla":
    raise ValueError(f"{op}: interpret=True needs a kernel backend: pass backend='triton' or "
                     "'tpu'")
  return backend
