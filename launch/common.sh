# Shared by the launchers (sourced). The caller sets `me` (its name) and `script` (its path).

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$script"; }
die() { echo "$me: $*" >&2; echo "$me: see $me --help" >&2; exit 2; }

# Shell-quote one word so that a POSIX shell (or Python's shlex.split) reads it back unchanged.
q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

qjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

# Print a command as one copy-pasteable line.
show() { printf '%s\n' "$(qjoin "$@")"; }

# The coder_jax.main arguments must name a run config (the cluster launchers have no default).
require_gin_file() {
  local a
  for a in "$@"; do case "$a" in --gin_file=*|--gin_file) return 0;; esac; done
  die "no --gin_file=F among the coder_jax.main arguments"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

dry_run=0
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then dry_run=1; fi

# Print the command (stdout in a dry run, stderr with "+ " otherwise) and run it unless dry.
run() {
  if [ "$dry_run" = 1 ]; then
    show "$@"
  else
    printf '+ %s\n' "$(qjoin "$@")" >&2
    "$@"
  fi
}
