#!/usr/bin/env bash
# Local launcher: runs coder_jax.main on this machine with the given gin files and bindings.
#   launch/local.sh --gin_file=gin_configs/runs/demo.gin [--gin.NAME=VALUE ...]
# Set FAKE_DEVICES=N to simulate N CPU devices (for mesh experiments without accelerators).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${FAKE_DEVICES:-}" ]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${FAKE_DEVICES} ${XLA_FLAGS:-}"
fi
exec "$root/run.sh" "$@"
