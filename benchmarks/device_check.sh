#!/usr/bin/env bash
# The kernels' device check in one call (for the GPU machine, which has jax but no gin, no
# tokamax and no network): the kernel tests compiled for the GPU, benchmarks/kernels.py with
# block-size tuning, and benchmarks/decode.py on the Lite-width proxy. From the repository root:
#   bash benchmarks/device_check.sh [WHEEL_DIR]     # WHEEL_DIR default .whl
#   PARTS="kernels" bash benchmarks/device_check.sh # only some parts (tests, kernels, decode)
# The parts' time limits (TEST_TIMEOUT 150 s, BENCH_TIMEOUT 300 s, DECODE_TIMEOUT 120 s) keep one
# call under the device tool's 600 s; every table is printed as soon as it is measured, so a part
# cut short still reports what it finished.
# WHEEL_DIR holds pure-Python wheels to install first: gin-config, and optionally tokamax
# 0.0.17 with its dependencies (qwix, einshape, jaxtyping, wadler-lindig, typeguard==2.13.3,
# tensorboardx, pydantic + pydantic-core, typing-inspection, annotated-types, immutabledict).
set -uo pipefail
wheels="${1:-.whl}"
site=/tmp/coder_jax_site
rm -rf "$site" && mkdir -p "$site/xprof/cli"
# One wheel at a time: a wheel this Python cannot take (e.g. a cp312 build elsewhere) only
# loses what needs it (tokamax), not the run.
for w in "$wheels"/*.whl; do
  [ -e "$w" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$w" 2>/dev/null || echo "warning: could not install $(basename "$w")"
done
# tokamax's top-level import wants xprof (absent there); one name is enough for it to import.
touch "$site/xprof/__init__.py" "$site/xprof/cli/__init__.py"
echo "def get_kernel_stats_tool(*args, **kwargs): raise NotImplementedError('xprof stub')" \
  > "$site/xprof/cli/tools.py"
export PYTHONPATH="$site:$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
parts="${PARTS:-tests kernels decode}"
for part in $parts; do
  case "$part" in
    tests)
      # (The expert-parallel model test wants 4 devices; it runs on fake CPU devices in ./test.sh.)
      echo "== kernel tests, compiled for the device"
      JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q \
        -p no:xdist -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_gmm.py \
        tests/test_kernels_decode.py tests/test_kernels_model.py -k "not expert_parallel and not \
        per_shard" 2>&1 | grep -v "^I0000\|^W0000" | tail -25 ;;
    kernels)
      echo "== benchmarks/kernels.py --tune"
      timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/kernels.py --tune 2>&1 \
        | grep -v "^I0000\|^W0000" ;;
    decode)
      echo "== benchmarks/decode.py --lite_proxy"
      timeout "${DECODE_TIMEOUT:-120}" python3 benchmarks/decode.py --lite_proxy \
        --attention_impls auto,reference 2>&1 | grep -v "^I0000\|^W0000" ;;
    *) echo "unknown part $part (tests, kernels, decode)"; exit 2 ;;
  esac
done
