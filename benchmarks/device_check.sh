#!/usr/bin/env bash
# The kernels' device check in one call (for the GPU machine, which has jax but no gin, no
# tokamax and no network): the kernel tests compiled for the GPU, then benchmarks/kernels.py
# with block-size tuning. From the repository root:
#   bash benchmarks/device_check.sh [WHEEL_DIR]     # WHEEL_DIR default .whl
# WHEEL_DIR holds pure-Python wheels to install first: gin-config, and optionally tokamax
# 0.0.17 with its dependencies (qwix, einshape, jaxtyping, wadler-lindig, typeguard==2.13.3,
# tensorboardx, pydantic + pydantic-core, typing-inspection, annotated-types, immutabledict).
set -uo pipefail
wheels="${1:-.whl}"
site=/tmp/coder_jax_site
rm -rf "$site" && mkdir -p "$site/xprof/cli"
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl || exit 1
fi
# tokamax's top-level import wants xprof (absent there); one name is enough for it to import.
touch "$site/xprof/__init__.py" "$site/xprof/cli/__init__.py"
echo "def get_kernel_stats_tool(*args, **kwargs): raise NotImplementedError('xprof stub')" \
  > "$site/xprof/cli/tools.py"
export PYTHONPATH="$site:$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
# (The expert-parallel model test wants 4 devices; it runs on fake CPU devices in ./test.sh.)
echo "== kernel tests, compiled for the device"
JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q \
  -p no:xdist -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_gmm.py \
  tests/test_kernels_model.py -k "not expert_parallel" 2>&1 | grep -v "^I0000\|^W0000" | tail -25
echo "== benchmarks/kernels.py --tune"
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/kernels.py --tune 2>&1 \
  | grep -v "^I0000\|^W0000"
