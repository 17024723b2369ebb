#!/usr/bin/env bash
# The test suite: sets up .venv (with the test extras) on first use, then runs pytest.
# Extra arguments go to pytest, e.g. ./test.sh -k parity
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh" requirements-test.txt
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m pytest -n 2 --dist loadfile "$@"
