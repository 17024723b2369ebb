#!/usr/bin/env bash
# The main job: sets up .venv on first use, then runs a gin config (default: pretraining the tiny
# model on the embedded corpus, gin_configs/experiments/tiny_pretrain.gin).
# Extra arguments go to coder_jax.main, e.g. ./run.sh --gin.TRAIN_STEPS=600 or --dry_run
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh" requirements.txt
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
has_gin_file=0
for a in "$@"; do case "$a" in --gin_file=*|--gin_file) has_gin_file=1;; esac; done
if [ "$has_gin_file" = 0 ]; then set -- --gin_file=gin_configs/experiments/tiny_pretrain.gin "$@"; fi
exec "$root/.venv/bin/python" -m coder_jax.main "$@"
