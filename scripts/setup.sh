#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from a requirements file.
# Usage: scripts/setup.sh [requirements.txt|requirements-test.txt]. Re-installs only when the
# requirements files change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements.txt}"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.stamp-$(basename "$req" .txt)"
want="$(cat "$root/requirements.txt" "$root/$req" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
if [ "$req" = "requirements-test.txt" ]; then
  want="$want-$(sha256sum "$root/requirements-triton.txt" | cut -d' ' -f1)"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$root/$req"
  if [ "$req" = "requirements-test.txt" ]; then
    # Off the import path (requirements-triton.txt says why); compile_report runs it apart.
    "$venv/bin/python" -m pip uninstall --quiet --yes triton 2>/dev/null || true
    rm -rf "$venv/triton"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
      --target "$venv/triton" -r "$root/requirements-triton.txt"
  fi
  echo "$want" > "$stamp"
fi
if [ "$req" = "requirements-test.txt" ]; then
  # libtpu, the TPU compiler that the tests (and --compile_topology) compile Mosaic kernels and
  # train steps with: the version the installed jax's `tpu` extra pins, kept off the import path
  # in .venv/libtpu (on it, every CPU jax process tries to start a TPU and prints warnings);
  # coder_jax/train/aot.py points TPU_LIBRARY_PATH at it when it compiles.
  spec="$("$venv/bin/python" -c 'from importlib.metadata import requires as r
print(next((q.split(";")[0].replace(" ", "") for q in r("jax") or ()
            if q.startswith("libtpu") and "tpu" in q.partition(";")[2]), "libtpu"))')"
  if [ ! -f "$venv/libtpu/libtpu/libtpu.so" ] || [ "$(cat "$venv/libtpu/.spec" 2>/dev/null)" != "$spec" ]; then
    rm -rf "$venv/libtpu"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
      --target "$venv/libtpu" "$spec"
    echo "$spec" > "$venv/libtpu/.spec"
  fi
fi
