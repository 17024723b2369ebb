"""Reading a run's metrics.jsonl in tests (the library's reader)."""

from coder_jax.train.metrics import read_metrics

__all__ = ["read_metrics"]
