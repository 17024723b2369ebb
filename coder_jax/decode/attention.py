"""Attention over the latent cache at decode time, by name (like `attention_impl`).

  reference       XLA (pallas_kernels.decode_attention's reference)
  pallas          this platform's kernel (Triton on GPU, Mosaic on TPU; on CPU the Triton
                  kernel in Pallas' interpreter)
  pallas_triton / pallas_tpu   one backend, interpreted off its platform
  auto            pallas on GPU and TPU, reference on CPU (the platform compiled for: see
                  pallas_kernels.backends.target_platform)
Each is `fn(q_latent [B, H, R], q_rope [B, H, K], latent [B, S, R], rope [B, S, K],
lengths [B], sm_scale) -> [B, H, R]`.
"""

from __future__ import annotations

import functools

from coder_jax.model.kernels import kernel_backend, target_platform
from coder_jax.parallel.rules import per_shard

def _reference(q_latent, q_rope, latent, rope, lengths, sm_scale):
  from pallas_kernels.decode_attention.reference import reference_latent_decode_attention
  # decode/cache.py's caches start zeroed and hold only computed entries (finite).
  return reference_latent_decode_attention(q_latent, q_rope, latent, rope, lengths,
                                           sm_scale=sm_scale, finite_cache=True)


def _kernel(q_latent, q_rope, latent, rope, lengths, sm_scale, *, backend):
  from pallas_kernels.decode_attention import latent_decode_attention
  backend, interpret = kernel_backend(backend)

  def run(q_latent, q_rope, latent, rope, lengths):
    return latent_decode_attention(q_latent, q_rope, latent, rope, lengths, sm_scale=sm_scale,
                                   backend=backend, interpret=interpret)
  # Under a mesh each device attends for its own rows (the kernel is opaque to XLA's
  # partitioner); heads and the latent stay whole.
  rows3, rows2 = ("batch", None, None), ("batch",)
  return per_shard(run, (q_latent, q_rope, latent, rope, lengths),
                   (rows3, rows3, rows3, rows3, rows2), rows3, q_latent.shape)


IMPLS = {
    "reference": _reference,
    "pallas": functools.partial(_kernel, backend=None),
    "pallas_triton": functools.partial(_kernel, backend="triton"),
    "pallas_tpu": functools.partial(_kernel, backend="tpu"),
}
IMPLS["xla"] = IMPLS["reference"]


def get_decode_attention(name: str):
  if name == "auto":
    name = "reference" if target_platform() == "cpu" else "pallas"
  if name not in IMPLS:
    raise ValueError(f"decode attention_impl: unknown implementation {name!r}; registered: "
                     f"auto, {', '.join(sorted(IMPLS))}")
  return IMPLS[name]
