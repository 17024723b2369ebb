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
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/$req"
  if [ "$req" = "requirements-test.txt" ]; then
    # Off the import path (requirements-triton.txt says why); compile_report runs it apart.
    "$venv/bin/python" -m pip uninstall --quiet --yes triton 2>/dev/null || true
    rm -rf "$venv/triton"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$venv/triton" -r "$root/requirements-triton.txt"
  fi
  echo "$want" > "$stamp"
fi
