#!/usr/bin/env bash
# SLURM launcher: writes an sbatch script that runs coder_jax.main as one process per node
# (one jax.distributed job over all the nodes' GPUs) and submits it with sbatch.
#
# Usage:
#   [DRY_RUN=1] launch/slurm.sh --nodes N [--gpus_per_node 8] [--partition P]
#       [--time 24:00:00] [--job_name coder_jax] [--port 12355] [--account A]
#       [--repo_dir DIR] [--log_dir DIR] [--script_out PATH]
#       [--] --gin_file=F [--gin.NAME=VALUE ...]
#
# Launcher options come first (`--opt VALUE` or `--opt=VALUE`); the first other argument (or
# everything after `--`) starts the arguments for `python -m coder_jax.main`.
#
#   --nodes          number of nodes (required); one task per node.
#   --port           coordinator port on the job's first node.
#   --repo_dir       the repository on the nodes' shared file system (default: this checkout);
#                    its .venv must exist (scripts/setup.sh requirements.txt, plus a CUDA jax,
#                    e.g. .venv/bin/pip install "jax[cuda12]").
#   --log_dir        where SLURM writes JOB_NAME-JOBID.out (default REPO_DIR/runs/slurm).
#   --script_out     keep the sbatch script at PATH (default: a temp file, removed after
#                    submission).
#
# Each task runs, in REPO_DIR,
#   CODER_JAX_COORDINATOR=FIRST_NODE:PORT CODER_JAX_NUM_PROCESSES=$SLURM_NTASKS
#   CODER_JAX_PROCESS_ID=$SLURM_PROCID PYTHONPATH=. .venv/bin/python -m coder_jax.main ARGS
# with the SLURM variables expanded by each task's own shell.
# DRY_RUN=1 prints the commands (writing the script is printed as a `cat > PATH <<'EOF'`
# here-document holding the script) and runs nothing.
#
# Examples:
#   launch/slurm.sh --nodes 4 --partition gpu --time 48:00:00 \
#       --gin_file=gin_configs/experiments/coder_v2_lite_pretrain.gin --gin.MODEL_DIR="'/shared/runs/a b'"
#   DRY_RUN=1 launch/slurm.sh --nodes 2 --gin_file=gin_configs/experiments/coder_v2_lite_pretrain.gin
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
me="launch/slurm.sh"
script="${BASH_SOURCE[0]}"
# shellcheck source=launch/common.sh
source "$root/launch/common.sh"

nodes="" gpus_per_node=8 partition="" time_limit="24:00:00" job_name="coder_jax" port=12355
account="" repo_dir="$root" log_dir="" script_out=""
while [ $# -gt 0 ]; do
  opt=$1 val="" has_val=0
  case "$opt" in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1;;
  esac
  case "$opt" in
    --nodes|--gpus_per_node|--partition|--time|--job_name|--port|--account|--repo_dir|--log_dir|--script_out)
      if [ "$has_val" = 0 ]; then
        [ $# -ge 2 ] || die "$opt needs a value"
        val=$2; shift
      fi
      [ -n "$val" ] || die "$opt needs a non-empty value"
      case "$opt" in
        --nodes) nodes=$val;; --gpus_per_node) gpus_per_node=$val;;
        --partition) partition=$val;; --time) time_limit=$val;; --job_name) job_name=$val;;
        --port) port=$val;; --account) account=$val;; --repo_dir) repo_dir=$val;;
        --log_dir) log_dir=$val;; --script_out) script_out=$val;;
      esac
      shift;;
    -h|--help) usage; exit 0;;
    --) shift; break;;
    *) break;;
  esac
done
# "$@" is now the coder_jax.main arguments.

[ -n "$nodes" ] || die "missing --nodes N (the number of nodes, one process each)"
if ! is_uint "$nodes" || [ "$nodes" -lt 1 ]; then die "--nodes must be a positive integer, got '$nodes'"; fi
if ! is_uint "$gpus_per_node"; then die "--gpus_per_node must be an integer, got '$gpus_per_node'"; fi
if ! is_uint "$port" || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  die "--port must be a port number, got '$port'"
fi
case "$job_name$partition$account$time_limit" in
  *[[:space:]]*) die "--job_name, --partition, --account and --time must not contain spaces";;
esac
require_gin_file "$@"
log_dir="${log_dir:-$repo_dir/runs/slurm}"
case "$log_dir" in *[[:space:]]*) die "--log_dir must not contain spaces (#SBATCH --output)";; esac

# What each task runs. Single-quoted in the script, so $SLURM_* and $CODER_JAX_COORDINATOR
# are expanded by the task's own shell, not at submission or in the batch shell.
# shellcheck disable=SC2016
task='cd '"$(q "$repo_dir")"' && exec env CODER_JAX_COORDINATOR="$CODER_JAX_COORDINATOR"'
# shellcheck disable=SC2016
task+=' CODER_JAX_NUM_PROCESSES="$SLURM_NTASKS" CODER_JAX_PROCESS_ID="$SLURM_PROCID"'
task+=" PYTHONPATH=. .venv/bin/python -m coder_jax.main $(qjoin "$@")"

sbatch_lines=(
  "--job-name=$job_name"
  "--nodes=$nodes"
  "--ntasks-per-node=1"
)
if [ "$gpus_per_node" -gt 0 ]; then sbatch_lines+=("--gpus-per-node=$gpus_per_node"); fi
sbatch_lines+=("--time=$time_limit")
if [ -n "$partition" ]; then sbatch_lines+=("--partition=$partition"); fi
if [ -n "$account" ]; then sbatch_lines+=("--account=$account"); fi
sbatch_lines+=("--output=$log_dir/%x-%j.out")

# shellcheck disable=SC2016  # the single-quoted lines are the script's own expansions
sbatch_script() {
  echo '#!/usr/bin/env bash'
  local l
  for l in "${sbatch_lines[@]}"; do echo "#SBATCH $l"; done
  echo "# Written by launch/slurm.sh: one coder_jax.main process per node."
  echo 'set -euo pipefail'
  echo "cd $(q "$repo_dir")"
  echo '# The coordinator is the first node of the allocation.'
  echo '# (Not `| head -n 1`: with pipefail, scontrol dying of SIGPIPE would fail the job.)'
  echo 'hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"'
  echo 'read -r coordinator_host <<< "$hosts"'
  echo "export CODER_JAX_COORDINATOR=\"\$coordinator_host:$port\""
  echo 'echo "coder_jax: ${SLURM_NTASKS:-?} processes, coordinator $CODER_JAX_COORDINATOR"'
  echo "srun --export=ALL --kill-on-bad-exit=1 bash -c $(q "$task")"
}

if [ -n "$script_out" ]; then keep=1; path=$script_out; else keep=0; fi
if [ "$dry_run" = 1 ]; then
  [ "$keep" = 1 ] || path="${TMPDIR:-/tmp}/$job_name.$$.sbatch"
  eof=CODER_JAX_SBATCH_EOF
  echo "cat > $(q "$path") <<'$eof'"
  sbatch_script
  echo "$eof"
else
  if [ "$keep" = 0 ]; then
    path=$(mktemp "${TMPDIR:-/tmp}/$job_name.sbatch.XXXXXX")
    trap 'rm -f "$path"' EXIT
  fi
  sbatch_script > "$path"
  echo "$me: sbatch script: $path" >&2
fi
run mkdir -p "$log_dir"
run sbatch "$path"
