"""Pallas kernels (one folder per op: api.py, reference.py, one file per backend, vjp).

The model reaches kernels only through `coder_jax.model.register_attention_impl` and
`register_moe_impl`; the plain XLA references in coder_jax.model are the defaults.
"""
