#!/usr/bin/env bash
# Cloud TPU VM launcher: copies this working tree to every worker of a TPU VM (optionally
# creating the TPU and setting up .venv there), then runs coder_jax.main on all hosts at once.
#
# Usage:
#   [DRY_RUN=1] launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P]
#       [--accelerator v5p-64] [--version tpu-ubuntu2204-base] [--create] [--setup]
#       [--repo_dir ~/coder_jax] [--python python3] [--] --gin_file=F [--gin.NAME=VALUE ...]
#
# Launcher options come first (`--opt VALUE` or `--opt=VALUE`); the first other argument (or
# everything after `--`) starts the arguments for `python -m coder_jax.main`.
#
#   --tpu, --zone     the TPU VM (required).
#   --project         gcloud project (default: gcloud's configured one).
#   --create          create the TPU VM first (--accelerator, --version).
#   --setup           run scripts/setup.sh requirements.txt on every worker and install
#                     jax[tpu] (override with JAX_TPU_REQUIREMENT) into its .venv.
#   --repo_dir        where the tree goes on the workers (default ~/coder_jax; a leading ~ is
#                     the remote home, so quote it: --repo_dir '~/x').
#   --python          interpreter that creates the workers' .venv (needs Python 3.11+).
#
# Steps: [create] -> tar `git ls-files` (tracked + untracked, not ignored) -> scp to
# --worker=all -> untar -> [setup] -> on --worker=all:
#   cd REPO && CODER_JAX_DISTRIBUTED=1 PYTHONPATH=. .venv/bin/python -m coder_jax.main ARGS
# (CODER_JAX_DISTRIBUTED=1: jax.distributed.initialize finds the hosts from the TPU metadata.)
# DRY_RUN=1 prints every command, shell-quoted, one per line, and runs nothing.
# Needs git, GNU tar (TAR=gtar on macOS) and gcloud.
#
# Examples:
#   launch/tpu_vm.sh --tpu my-v5p --zone us-east5-a --create --setup \
#       --gin_file=gin_configs/experiments/coder_v2_lite_pretrain.gin
#   DRY_RUN=1 launch/tpu_vm.sh --tpu my-v5p --zone us-east5-a \
#       --gin_file=gin_configs/experiments/coder_v2_lite_pretrain.gin --gin.MODEL_DIR="'/mnt/shared/run 1'"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="launch/tpu_vm.sh"
script="${BASH_SOURCE[0]}"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"

tpu="" zone="" project="" accelerator="v5p-64" version="tpu-ubuntu2204-base"
# shellcheck disable=SC2088  # the ~ is meant for the workers' shell, see remote_repo
create=0 setup=0 repo_dir="~/coder_jax" python="python3"
while [ $# -gt 0 ]; do
  opt=$1 val="" has_val=0
  case "$opt" in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1;;
  esac
  case "$opt" in
    --tpu|--zone|--project|--accelerator|--version|--repo_dir|--python)
      if [ "$has_val" = 0 ]; then
        [ $# -ge 2 ] || die "$opt needs a value"
        val=$2; shift
      fi
      [ -n "$val" ] || die "$opt needs a non-empty value"
      case "$opt" in
        --tpu) tpu=$val;; --zone) zone=$val;; --project) project=$val;;
        --accelerator) accelerator=$val;; --version) version=$val;;
        --repo_dir) repo_dir=$val;; --python) python=$val;;
      esac
      shift;;
    --create|--setup)
      [ "$has_val" = 0 ] || die "$opt takes no value"
      if [ "$opt" = --create ]; then create=1; else setup=1; fi
      shift;;
    -h|--help) usage; exit 0;;
    --) shift; break;;
    *) break;;
  esac
done
# "$@" is now the coder_jax.main arguments.

[ -n "$tpu" ] || die "missing --tpu NAME (the TPU VM to run on)"
[ -n "$zone" ] || die "missing --zone ZONE (the TPU VM's zone)"
require_gin_file "$@"
command -v git >/dev/null || die "git is needed to list the files to copy"

gflags=(--zone "$zone")
if [ -n "$project" ]; then gflags+=(--project "$project"); fi

# The repo directory as the workers' shell should see it: a leading ~ becomes "$HOME".
# shellcheck disable=SC2016,SC2088  # "$HOME" and ~ are for the workers' shell
case "$repo_dir" in
  "~") remote_repo='"$HOME"';;
  "~/"*) remote_repo="\"\$HOME\"/$(q "${repo_dir#"~/"}")";;
  *) remote_repo=$(q "$repo_dir");;
esac

ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" "${gflags[@]}" --worker=all --command "$1"; }

if [ "$create" = 1 ]; then
  run gcloud compute tpus tpu-vm create "$tpu" "${gflags[@]}" \
    --accelerator-type "$accelerator" --version "$version"
fi

# Pack the working tree: tracked and untracked files that git does not ignore (files deleted
# but still tracked are skipped, with a warning, by GNU tar's --ignore-failed-read).
tarball="${TMPDIR:-/tmp}/coder_jax_src.$$.tar.gz"
remote_tarball="/tmp/coder_jax_src.tar.gz"
list_cmd=(git -C "$root" ls-files -z --cached --others --exclude-standard)
tar_cmd=("${TAR:-tar}" -C "$root" --null -T - --ignore-failed-read -czf "$tarball")
if [ "$dry_run" = 1 ]; then
  printf '%s | %s\n' "$(qjoin "${list_cmd[@]}")" "$(qjoin "${tar_cmd[@]}")"
else
  printf '+ %s | %s\n' "$(qjoin "${list_cmd[@]}")" "$(qjoin "${tar_cmd[@]}")" >&2
  trap 'rm -f "$tarball"' EXIT
  "${list_cmd[@]}" | "${tar_cmd[@]}"
fi
run gcloud compute tpus tpu-vm scp --recurse --worker=all "${gflags[@]}" \
  "$tarball" "$tpu:$remote_tarball"
run rm -f "$tarball"
ssh_all "mkdir -p $remote_repo && tar -xzf $remote_tarball -C $remote_repo && rm -f $remote_tarball"

if [ "$setup" = 1 ]; then
  jax_tpu="${JAX_TPU_REQUIREMENT:-jax[tpu]>=0.10.0,<0.12}"
  ssh_all "cd $remote_repo && PYTHON=$(q "$python") scripts/setup.sh requirements.txt && .venv/bin/python -m pip install --quiet --disable-pip-version-check $(q "$jax_tpu")"
fi

ssh_all "cd $remote_repo && CODER_JAX_DISTRIBUTED=1 PYTHONPATH=. .venv/bin/python -m coder_jax.main $(qjoin "$@")"
