import os

# Fake CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests (and their subprocesses, which inherit this) compile the same tiny programs again:
# jax's persistent compilation cache turns a 20-70 s recompile into a few seconds.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(__import__("tempfile").gettempdir(), "coder_jax_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def cpu_as_tpu_v5p(monkeypatch):
  """Mosaic's lowering (when lowering for "tpu" from another machine) asks for the device's TPU
  generation; describe this machine's first device as a v5p."""
  import jax
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: tpu_info._get_tpu_info_impl(tpu_info.ChipVersion.TPU_V5P, 2))
