#!/usr/bin/env bash
# Local launcher: runs coder_jax.main on this machine through ./run.sh (which sets up .venv).
#
# Usage:
#   [FAKE_DEVICES=N] [NUM_PROCESSES=P [COORDINATOR_PORT=PORT]] [DRY_RUN=1] \
#     launch/local.sh [--gin_file=F ...] [--gin.NAME=VALUE ...]
#
# Every argument goes to `python -m coder_jax.main` unchanged (run.sh adds
# --gin_file=gin_configs/experiments/tiny_pretrain.gin when none is given).
#
# Environment:
#   FAKE_DEVICES=N      prepend --xla_force_host_platform_device_count=N to XLA_FLAGS
#                       (N simulated CPU devices per process, for mesh experiments).
#   NUM_PROCESSES=P     start P local processes that form one jax.distributed job:
#                       CODER_JAX_COORDINATOR=127.0.0.1:PORT, CODER_JAX_NUM_PROCESSES=P and
#                       CODER_JAX_PROCESS_ID=0..P-1. The launcher waits for all of them; when
#                       one fails it stops the others and exits with that process's status.
#   COORDINATOR_PORT    the coordinator port for NUM_PROCESSES (default 12355).
#   DRY_RUN=1           print the commands (shell-quoted, one per line) and run nothing.
#   CODER_JAX_RUN_CMD   run this command (split on whitespace) instead of ./run.sh, and skip
#                       the .venv setup (for tests and debugging).
#
# Examples:
#   launch/local.sh --gin.TRAIN_STEPS=600
#   FAKE_DEVICES=8 launch/local.sh --gin.mesh_config.expert=4
#   NUM_PROCESSES=2 FAKE_DEVICES=4 launch/local.sh --gin.pretrain.data=@SyntheticData()
#   DRY_RUN=1 NUM_PROCESSES=2 launch/local.sh --gin.MODEL_DIR="'/tmp/a b'"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="launch/local.sh"
script="${BASH_SOURCE[0]}"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"

case "${1:-}" in
  -h|--help) usage; exit 0;;
esac

if [ -n "${CODER_JAX_RUN_CMD:-}" ]; then
  read -r -a run_cmd <<< "$CODER_JAX_RUN_CMD"
  setup_cmd=()
else
  run_cmd=("$root/run.sh")
  setup_cmd=("$root/scripts/setup.sh" requirements.txt)
fi

env_vars=()
if [ -n "${FAKE_DEVICES:-}" ]; then
  if ! is_uint "$FAKE_DEVICES" || [ "$FAKE_DEVICES" -lt 1 ]; then
    die "FAKE_DEVICES must be a positive integer, got '$FAKE_DEVICES'"
  fi
  env_vars+=("XLA_FLAGS=--xla_force_host_platform_device_count=$FAKE_DEVICES${XLA_FLAGS:+ $XLA_FLAGS}")
fi

# One process: hand over to run.sh.
if [ -z "${NUM_PROCESSES:-}" ]; then
  cmd=("${run_cmd[@]}" "$@")
  if [ "${#env_vars[@]}" -gt 0 ]; then cmd=(env "${env_vars[@]}" "${cmd[@]}"); fi
  if [ "$dry_run" = 1 ]; then show "${cmd[@]}"; exit 0; fi
  exec "${cmd[@]}"
fi

# Several processes forming one distributed job.
nproc="$NUM_PROCESSES"
if ! is_uint "$nproc" || [ "$nproc" -lt 1 ]; then
  die "NUM_PROCESSES must be a positive integer, got '$nproc'"
fi
port="${COORDINATOR_PORT:-12355}"
if ! is_uint "$port" || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  die "COORDINATOR_PORT must be a port number, got '$port'"
fi

process_cmd() {  # process_cmd I ARGS... -> sets the array `cmd`
  local i=$1; shift
  cmd=(env "${env_vars[@]}" "CODER_JAX_COORDINATOR=127.0.0.1:$port"
       "CODER_JAX_NUM_PROCESSES=$nproc" "CODER_JAX_PROCESS_ID=$i" "${run_cmd[@]}" "$@")
}

if [ "$dry_run" = 1 ]; then
  if [ "${#setup_cmd[@]}" -gt 0 ]; then show "${setup_cmd[@]}"; fi
  for ((i = 0; i < nproc; i++)); do process_cmd "$i" "$@"; show "${cmd[@]}"; done
  exit 0
fi

# Set up .venv once, so that the processes' run.sh find it ready instead of racing to build it.
if [ "${#setup_cmd[@]}" -gt 0 ]; then "${setup_cmd[@]}"; fi

# Job control gives every process its own process group, so stopping one stops its children too.
set -m
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
}
trap 'stop_all; wait; exit 130' INT
trap 'stop_all; wait; exit 143' TERM

for ((i = 0; i < nproc; i++)); do
  process_cmd "$i" "$@"
  echo "$me: process $i: $(show "${cmd[@]}")" >&2
  "${cmd[@]}" &
  pids+=("$!")
done
set +m  # the groups stay; this only silences the job-status messages

# Poll rather than `wait -n` so that we know which process ended (and work on older bash).
status=0
running=("${!pids[@]}")
while [ "${#running[@]}" -gt 0 ]; do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then still+=("$i"); continue; fi
    rc=0
    wait "${pids[$i]}" || rc=$?
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
      status=$rc
      echo "$me: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if [ "${#running[@]}" -gt 0 ]; then sleep 0.2; fi
done
exit "$status"
