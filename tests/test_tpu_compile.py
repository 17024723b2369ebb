"""The TPU compiler (libtpu, no TPU attached) compiles every Mosaic kernel at small ragged shapes
and a tiny model's whole train step for a 4-chip v5p topology (coder_jax/train/aot.py,
`--compile_topology`); wrong input is one line and exit status 2.

libtpu comes from scripts/setup.sh (requirements-test.txt says why it lives in .venv/libtpu).
Where it is absent (e.g. the GPU machine) these tests skip; under CI they fail instead, since CI
installs it. Benchmark shapes and Lite-width steps are compiled by benchmarks/tpu_memory.py.
"""

import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coder_jax import main as entry
from coder_jax.train import aot, topology

if aot.libtpu_path() is None:
  if os.environ.get("CI"):
    raise RuntimeError("CI: libtpu is missing; " + aot.install_hint())
  pytest.skip("libtpu is not installed: " + aot.install_hint(), allow_module_level=True)

KERNEL = re.compile(r'custom_call_target="tpu_custom_call"')


@pytest.fixture(scope="module")
def v5p_chip():
  """A one-chip mesh of a v5p topology: Mosaic reads the chip generation from the mesh."""
  devices = aot.topology_devices(aot.parse_topology("v5p-8"))
  return Mesh(np.array(devices[:1]), ("x",))


def compile_on(mesh, fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
  with jax.set_mesh(mesh), aot.no_persistent_cache():
    return jax.jit(fn).lower(*args).compile()


def kernels_in(compiled) -> int:
  return len(KERNEL.findall(compiled.as_text()))


@pytest.mark.parametrize("segments", [True, False])
def test_attention_forward_and_backward_compile(v5p_chip, segments):
  """B2 T200 (not a block multiple) H2, q/k 192, v 128, bf16: forward, dK/dV and dQ kernels."""
  from pallas_kernels import mla_attention
  bt, q, v = (2, 200), (2, 200, 2, 192), (2, 200, 2, 128)

  def loss(q, k, v, seg):
    out = mla_attention(q, k, v, segment_ids=seg if segments else None, backend="tpu")
    return out.astype(jnp.float32).sum()

  c = compile_on(v5p_chip, jax.grad(loss, argnums=(0, 1, 2)), (q, jnp.bfloat16),
                 (q, jnp.bfloat16), (v, jnp.bfloat16), (bt, jnp.int32))
  assert kernels_in(c) == 3


def test_attention_with_keys_longer_than_queries_compiles(v5p_chip):
  """The context-parallel path: T200 queries as the last of S328 keys (static q offset 128),
  segment ids over the keys: forward, dK/dV and dQ kernels."""
  from pallas_kernels import mla_attention

  def loss(q, k, v, seg):
    return mla_attention(q, k, v, segment_ids=seg, backend="tpu").astype(jnp.float32).sum()

  c = compile_on(v5p_chip, jax.grad(loss, argnums=(0, 1, 2)), ((2, 200, 2, 192), jnp.bfloat16),
                 ((2, 328, 2, 192), jnp.bfloat16), ((2, 328, 2, 128), jnp.bfloat16),
                 ((2, 328), jnp.int32))
  assert kernels_in(c) == 3


@pytest.mark.parametrize("sizes", [(0, 600, 0, 400, 0), (997, 1, 1, 1, 0)],
                         ids=["empty_groups", "skewed_groups"])
def test_grouped_matmul_forward_and_both_backward_kernels_compile(v5p_chip, sizes):
  """M1000 K200 N300 (none a tile multiple) G5, bf16, the group sizes known to the compiler:
  the forward, dLHS (a gmm on transposed weights) and dRHS (tgmm) kernels."""
  from pallas_kernels import grouped_matmul
  group_sizes = jnp.asarray(sizes, jnp.int32)

  def loss(lhs, rhs):
    return grouped_matmul(lhs, rhs, group_sizes, backend="tpu").astype(jnp.float32).sum()

  c = compile_on(v5p_chip, jax.value_and_grad(loss, argnums=(0, 1)), ((1000, 200), jnp.bfloat16),
                 ((5, 200, 300), jnp.bfloat16))
  assert kernels_in(c) == 3


def test_latent_decode_kernel_compiles(v5p_chip):
  """B3 H16 R512 Dr64 over a 1000-position cache (not a block multiple), bf16."""
  from pallas_kernels import latent_decode_attention

  def step(ql, qr, lat, rope, lengths):
    return latent_decode_attention(ql, qr, lat, rope, lengths, sm_scale=0.1, backend="tpu")

  c = compile_on(v5p_chip, step, ((3, 16, 512), jnp.bfloat16), ((3, 16, 64), jnp.bfloat16),
                 ((3, 1000, 512), jnp.bfloat16), ((3, 1000, 64), jnp.bfloat16),
                 ((3,), jnp.int32))
  assert kernels_in(c) == 1


TINY = ["--gin_file=gin_configs/experiments/tiny_pretrain.gin", "--gin.MODEL_DIR='/tmp/unused'",
        "--gin.model_config.moe_impl='auto'", "--gin.pretrain.compute_dtype='bfloat16'",
        "--gin.mesh_config.expert=2"]


def test_tiny_train_step_compiles_for_v5p_8_with_kernels_and_dry_run_bytes(capsys):
  """The tiny model (auto impls: the Mosaic attention and grouped matmul, compiled, not
  interpreted) on v5p-8 = 4 chips, fsdp 2 x expert 2: the compiler's argument bytes split
  exactly into the laid-out state and batch, and the state's logical bytes are --dry_run's."""
  gin.clear_config()
  try:
    report = entry.main(TINY + ["--compile_topology=v5p-8"])
    out = capsys.readouterr().out
    gin.clear_config()
    dry = entry.main(TINY + ["--dry_run", "--gin.pretrain.dry_run_devices=4"])
  finally:
    gin.clear_config()
  assert report["chips"] == 4 and report["mesh"]["expert"] == 2 and report["mesh"]["fsdp"] == 2
  assert report["mosaic_kernels"] >= 6        # attention fwd / dK dV / dQ, gmm fwd / dLHS / dRHS
  assert report["params_bytes"] == dry["params_bytes_per_device"]
  assert report["opt_state_bytes"] == dry["opt_state_bytes_per_device"]
  laid = [report[f"compiled_{k}_bytes"] for k in ("params", "opt_state", "other_state", "batch")]
  assert report["argument_bytes"] == sum(laid)
  # Tiny dims are padded to 8 x 128 tiles; the logical bytes are a lower bound.
  assert laid[0] >= report["params_bytes"] and laid[1] >= report["opt_state_bytes"]
  assert laid[2] <= 4 * 512          # step, rng, the non-finite count: a 512-byte tile each
  assert report["fits"] and report["temp_bytes"] > 0 and report["roofline_s"] > 0
  assert 0 < report["mfu_bound"] <= 1
  assert "fits, " in out and "roofline" in out and "Mosaic kernels" in out
  assert jax.default_backend() == "cpu"


def test_236b_on_v5p_8_does_not_fit(capsys):
  """The float32 state of 236B over 4 chips is ~700 GB a chip: reported with the numbers,
  without spending minutes compiling."""
  gin.clear_config()
  try:
    report = entry.main(["--gin_file=gin_configs/experiments/coder_v2_pretrain.gin",
                         "--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'",
                         "--gin.mesh_config.fsdp=-1", "--gin.mesh_config.expert=4",
                         "--compile_topology=v5p-8"])
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  assert not report["fits"] and not report["compiled"]
  assert report["total_bytes"] > 6 * report["hbm_bytes"]
  assert "does NOT fit" in out and "GiB" in out


# Reference attention and dense experts: the other stages' steps and GRPO's sampler in about
# 10 s of compiling each (the kernels are compiled above and in the pretraining step).
SMALL = ["--gin.MODEL_DIR='/tmp/unused'", "--gin.model_config.attention_impl='reference'",
         "--gin.model_config.moe_impl='dense'"]


def test_tiny_grpo_compiles_train_step_and_sampler_for_v5p_8(capsys):
  """GRPO: the policy's train step (GRPO loss over response positions) and the sampler as the
  stage runs it (one prefill per group of G rows, the decode loop with the Mosaic latent
  decode kernel), both for the 4 chips of v5p-8."""
  gin.clear_config()
  try:
    report = entry.main(["--gin_file=gin_configs/experiments/tiny_grpo.gin", *SMALL,
                         "--gin.grpo.seq_len=64", "--gin.grpo.max_new_tokens=8",
                         "--gin.PROMPTS_PER_STEP=4", "--gin.GROUP_SIZE=2",
                         "--compile_topology=v5p-8"])
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  assert report["stage"] == "grpo" and report["compiled"] and report["fits"]
  assert report["mesh"]["fsdp"] == 4
  assert {"advantages", "old_logp", "ref_logp"} <= set(report["batch_keys"])   # beta 0.04 > 0
  assert report["argument_bytes"] == sum(
      report[f"compiled_{k}_bytes"] for k in ("params", "opt_state", "other_state", "batch"))
  dec = report["decode"]
  # 4 prompts x G 2 = 8 rows over 4 shards; the prompt slot is seq_len - max_new_tokens + 1.
  assert (dec["rows"], dec["group"], dec["prompt_len"], dec["max_new_tokens"]) == (8, 2, 57, 8)
  assert dec["compiled"] and dec["fits"] and dec["mosaic_kernels"] >= 1
  assert 0 < dec["total_bytes"] < report["total_bytes"]
  assert "sampler              8 rows x (57 prompt + 8 new) tokens, one prefill per 2 rows" in out


def test_tiny_reward_model_compiles_for_v5p_8(capsys):
  """The reward model's train step: the backbone --dry_run counts plus the D x 1 score head."""
  rm = ["--gin_file=gin_configs/experiments/tiny_reward_model.gin", *SMALL, "--gin.SEQ_LEN=64",
        "--gin.BATCH_SIZE=8"]
  gin.clear_config()
  try:
    report = entry.main(rm + ["--compile_topology=v5p-8"])
    gin.clear_config()
    dry = entry.main(rm + ["--dry_run", "--gin.reward_model.dry_run_devices=4"])
  finally:
    gin.clear_config()
  assert report["stage"] == "reward_model" and report["compiled"] and report["fits"]
  assert report["mesh"]["fsdp"] == 4 and "decode" not in report
  head = 64 // 4 * 4               # [hidden 64, 1] float32, its hidden dim split over fsdp 4
  assert report["params_bytes"] == dry["params_bytes_per_device"] + head
  assert report["argument_bytes"] == sum(
      report[f"compiled_{k}_bytes"] for k in ("params", "opt_state", "other_state", "batch"))
  assert report["temp_bytes"] > 0 and "fits, " in capsys.readouterr().out


def test_smallest_fit_skips_hopeless_sizes_without_compiling(monkeypatch, capsys):
  """v5p-auto for 236B (expert 8): v5p-8's 4 chips cannot hold the expert axis, v5p-16 to
  v5p-64 cannot hold the float32 parameters, Adam state and gradients (16 bytes a parameter,
  ~3.8 TB in all; on v5p-64's 32 chips 110 GiB a chip), so the first compile is v5p-128; here
  the compiler is stubbed to say that v5p-128 does not fit and v5p-256 does, and the search
  stops there."""
  compiled = []

  def fake_compile_for(topo, save_to, **kw):
    compiled.append(topo.name)
    if topo.chips < 128:     # as the real compiler answers for v5p-128
      return {"topology": topo.name, "fits": False, "compiled": False,
              "compiler_message": "RESOURCE_EXHAUSTED: Ran out of memory on HBM"}
    return {"topology": topo.name, "chips": topo.chips, "fits": True, "compiled": True,
            "total_bytes": 80e9}

  monkeypatch.setattr(aot, "_compile_for", fake_compile_for)
  gin.clear_config()
  try:
    report = entry.main(["--gin_file=gin_configs/experiments/coder_v2_pretrain.gin",
                         "--gin.MODEL_DIR='/tmp/unused'", "--gin.DATA_DIR='/tmp/unused'",
                         "--compile_topology=v5p-auto"])
  finally:
    gin.clear_config()
  out = capsys.readouterr().out
  assert compiled == ["v5p-128", "v5p-256"]
  assert report["topology"] == "v5p-256" and report["fits"]
  steps = {s["topology"]: s for s in report["search"]}
  assert list(steps) == ["v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256"]
  assert "not divisible by the fixed axes" in steps["v5p-8"]["reason"]
  for name in ("v5p-16", "v5p-32", "v5p-64"):
    assert re.search(r"\+ gradients .* already exceed the 88.48 GiB of HBM",
                     steps[name]["reason"])
  assert steps["v5p-128"]["outcome"] == "does not fit"
  assert steps["v5p-128"]["compiler_message"].startswith("RESOURCE_EXHAUSTED")
  assert steps["v5p-256"] == {"topology": "v5p-256", "outcome": "fits", "total_bytes": 80e9}
  assert "smallest that fits   v5p-256 (128 chips)" in out


@pytest.mark.parametrize("name, first, last, count", [
    ("v5p-auto", "v5p-8", "v5p-16384", 12), ("v5e-auto", "v5e-1", "v5e-256", 8),
    ("v4-auto", "v4-8", "v4-8192", 11),
])
def test_auto_topologies_run_from_the_smallest_to_the_largest_slice(name, first, last, count):
  topos = aot.topology_candidates(name)
  assert (topos[0].name, topos[-1].name, len(topos)) == (first, last, count)
  assert [t.chips for t in topos] == sorted(t.chips for t in topos)
  assert topos[-1].chips <= topos[-1].chip.max_chips


@pytest.mark.parametrize("flags, message", [
    (["--compile_topology=v9x-8"], r"unknown topology 'v9x-8'; use v4-N, v5e-N, v5p-N, v6e-N"),
    (["--compile_topology=v9x-auto"], r"unknown topology 'v9x-auto'; .* or GEN-auto"),
    (["--compile_topology=v5p-auto", "--compile_topology_num_slices=0"],
     r"--compile_topology_num_slices must be a positive integer, got 0"),
    (["--compile_topology=v5p-12"], r"'v5p-12' is not a v5p slice size"),
    (["--compile_topology=v5p-8", "--gin.mesh_config.fsdp=1", "--gin.mesh_config.expert=8"],
     r"v5p-8 has 4 chips; mesh_config: axes .* multiply to 8, but there are 4 devices"),
    (["--compile_topology=v5p-8", "NO_LIBTPU"],
     r"libtpu is not installed, so there is no TPU compiler; install it with "
     r"`scripts/setup.sh requirements-test.txt`.*pip install \"jax\[tpu\]=="),
])
def test_bad_topology_input_is_one_line_with_exit_2(flags, message, monkeypatch, capsys):
  if "NO_LIBTPU" in flags:
    flags = [f for f in flags if f != "NO_LIBTPU"]
    monkeypatch.setattr(topology, "libtpu_path", lambda: None)
  gin.clear_config()
  try:
    assert entry.run(TINY + flags) == 2
  finally:
    gin.clear_config()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize("name, chips, grid", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-16", 8, (2, 2, 2)), ("v5p-32", 16, (2, 2, 4)),
    ("v5p-512", 256, (4, 8, 8)), ("v5e-256", 256, (16, 16)), ("v6e-32", 32, (4, 8)),
    ("v4-8", 4, (2, 2, 1)), ("v6e-1", 1, (1, 1)),
])
def test_topology_names_follow_cloud_tpu(name, chips, grid):
  topo = aot.parse_topology(name)
  assert (topo.chips, topo.grid) == (chips, grid)


def test_kernels_follow_the_mesh_not_the_host(v5p_chip):
  """One rule (pallas_kernels.backends.target_platform): under a TPU topology's mesh `auto` and
  `pallas` mean the Mosaic kernels, compiled, and the layers a scan; under this machine's CPU
  mesh they stay the XLA paths and the interpreter, and the layers are unrolled."""
  from coder_jax.decode.attention import IMPLS, get_decode_attention
  from coder_jax.model.config import get_config
  from coder_jax.model.decoder import LayerStack
  from coder_jax.model.kernels import kernel_backend
  from pallas_kernels.backends import resolve_backend
  cpu = Mesh(np.array(jax.devices()[:1]), ("x",))
  stack = lambda scan: LayerStack(get_config("tiny", scan_layers=scan), "dense", 2,
                                  rngs=nnx.Rngs(0))
  auto, scan, unrolled = stack(None), stack(True), stack(False)
  with jax.set_mesh(v5p_chip):
    assert kernel_backend(None) == ("tpu", False) and kernel_backend("triton") == ("triton", True)
    assert resolve_backend("op", None, False) == "tpu"
    assert get_decode_attention("auto") is IMPLS["pallas"]
    assert (auto.scans(), scan.scans(), unrolled.scans()) == (True, True, False)
  with jax.set_mesh(cpu):
    assert kernel_backend(None) == ("triton", True) and kernel_backend("tpu") == ("tpu", True)
    assert resolve_backend("op", None, False) == "xla"
    assert get_decode_attention("auto") is IMPLS["reference"]
    assert (auto.scans(), scan.scans(), unrolled.scans()) == (False, True, False)
  assert jax.default_backend() == "cpu"
