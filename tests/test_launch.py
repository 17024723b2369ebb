"""The launchers (launch/*.sh): dry runs print the right commands, arguments survive the
quoting, bad options exit 2, and the generated commands do what they say when run against
stubs (a fake python, fake gcloud / srun / scontrol / sbatch). Nothing real is launched."""

import json
import os
import shlex
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "tpu_vm.sh", "slurm.sh"]

# Arguments for coder_jax.main that need quoting: spaces, both quote kinds, $ and backticks.
ARGS = [
  "--gin_file=gin_configs/runs/demo.gin",
  "--gin.MODEL_DIR='/tmp/a b'",
  "--gin.note=\"it's $HOME `x` \\n\"",
  "--gin.empty=''",
  "--dry_run",
]

LAUNCH_ENV = ("DRY_RUN", "FAKE_DEVICES", "NUM_PROCESSES", "COORDINATOR_PORT", "CODER_JAX_RUN_CMD",
              "XLA_FLAGS", "JAX_TPU_REQUIREMENT", "TAR")


def launch(script, args=(), timeout=30, **env):
  e = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
  e.update(env)
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=e, capture_output=True,
                        text=True, timeout=timeout)


def dry(script, args=(), **env):
  r = launch(script, args, DRY_RUN="1", **env)
  assert r.returncode == 0, r.stderr
  return r.stdout.splitlines()


def main_args(tokens):
  """The arguments after `-m coder_jax.main` in a parsed command."""
  i = tokens.index("coder_jax.main")
  assert tokens[i - 1] == "-m"
  return tokens[i + 1:]


def write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def fake_python(path):
  """An executable that records its argv, cwd and the launch variables in $FAKE_OUT."""
  return write_exe(path, f"""#!{sys.executable}
import json, os, sys
env = {{k: v for k, v in os.environ.items()
       if k.startswith("CODER_JAX") or k in ("PYTHONPATH", "XLA_FLAGS")}}
name = "proc%s.json" % env.get("CODER_JAX_PROCESS_ID", "")
with open(os.path.join(os.environ["FAKE_OUT"], name), "w") as f:
  json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}}, f)
""")


def fake_repo(path):
  """A directory with .venv/bin/python = fake_python."""
  (path / ".venv" / "bin").mkdir(parents=True)
  fake_python(path / ".venv" / "bin" / "python")
  return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_help(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
  r = launch(script, ["--help"])
  assert r.returncode == 0 and "Usage:" in r.stdout and "DRY_RUN=1" in r.stdout


# ---------------------------------------------------------------------------------- local.sh

def test_local_dry_run_one_process():
  lines = dry("local.sh", ARGS)
  assert len(lines) == 1
  assert shlex.split(lines[0]) == [str(ROOT / "run.sh"), *ARGS]


def test_local_fake_devices_prepends_xla_flag():
  lines = dry("local.sh", ["--gin_file=a.gin"], FAKE_DEVICES="4", XLA_FLAGS="--xla_foo=1")
  tokens = shlex.split(lines[0])
  assert tokens[:2] == ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=4 --xla_foo=1"]
  assert tokens[2:] == [str(ROOT / "run.sh"), "--gin_file=a.gin"]


def test_local_dry_run_processes():
  lines = dry("local.sh", ARGS, NUM_PROCESSES="3", COORDINATOR_PORT="23456", FAKE_DEVICES="2")
  assert shlex.split(lines[0]) == [str(ROOT / "scripts" / "setup.sh"), "requirements.txt"]
  assert len(lines) == 4
  for i, line in enumerate(lines[1:]):
    assert shlex.split(line) == [
      "env", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
      "CODER_JAX_COORDINATOR=127.0.0.1:23456", "CODER_JAX_NUM_PROCESSES=3",
      f"CODER_JAX_PROCESS_ID={i}", str(ROOT / "run.sh"), *ARGS]
  default = dry("local.sh", ["--gin_file=a.gin"], NUM_PROCESSES="2")
  assert "CODER_JAX_COORDINATOR=127.0.0.1:12355" in shlex.split(default[1])


@pytest.mark.parametrize("env, word", [
  ({"NUM_PROCESSES": "two"}, "NUM_PROCESSES"),
  ({"NUM_PROCESSES": "0"}, "NUM_PROCESSES"),
  ({"FAKE_DEVICES": "-1"}, "FAKE_DEVICES"),
  ({"NUM_PROCESSES": "2", "COORDINATOR_PORT": "70000"}, "COORDINATOR_PORT"),
])
def test_local_bad_env_exits_2(env, word):
  r = launch("local.sh", ["--gin_file=a.gin"], DRY_RUN="1", **env)
  assert r.returncode == 2 and word in r.stderr and not r.stdout


def test_local_runs_processes(tmp_path):
  fake = fake_python(tmp_path / "fake_main")
  out = tmp_path / "out"
  out.mkdir()
  r = launch("local.sh", ARGS, NUM_PROCESSES="3", COORDINATOR_PORT="23457",
             CODER_JAX_RUN_CMD=str(fake), FAKE_OUT=str(out))
  assert r.returncode == 0, r.stderr
  for i in range(3):
    rec = json.loads((out / f"proc{i}.json").read_text())
    assert rec["argv"] == ARGS
    assert {k: rec["env"].get(k) for k in ("CODER_JAX_COORDINATOR", "CODER_JAX_NUM_PROCESSES",
                                           "CODER_JAX_PROCESS_ID")} == {
      "CODER_JAX_COORDINATOR": "127.0.0.1:23457", "CODER_JAX_NUM_PROCESSES": "3",
      "CODER_JAX_PROCESS_ID": str(i)}


def test_local_one_failure_stops_the_others(tmp_path):
  fake = write_exe(tmp_path / "fake_main", """#!/usr/bin/env bash
if [ "$CODER_JAX_PROCESS_ID" = 1 ]; then sleep 0.3; exit 3; fi
sleep 20
touch "$FAKE_OUT/finished$CODER_JAX_PROCESS_ID"
""")
  start = time.monotonic()
  r = launch("local.sh", ["--gin_file=a.gin"], NUM_PROCESSES="3", CODER_JAX_RUN_CMD=str(fake),
             FAKE_OUT=str(tmp_path))
  assert r.returncode == 3
  assert time.monotonic() - start < 10
  assert "process 1 exited with status 3" in r.stderr
  assert not list(tmp_path.glob("finished*"))


# --------------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_dry_run_create_setup_run():
  lines = dry("tpu_vm.sh", ["--tpu", "my-tpu", "--zone=us-east5-a", "--project", "proj", "--create",
                            "--setup", "--accelerator", "v5p-128", *ARGS])
  cmds = [shlex.split(line) for line in lines]
  gflags = ["--zone", "us-east5-a", "--project", "proj"]
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *gflags,
                     "--accelerator-type", "v5p-128", "--version", "tpu-ubuntu2204-base"]
  pipe = lines[1].split(" | ")
  assert shlex.split(pipe[0])[:4] == ["git", "-C", str(ROOT), "ls-files"]
  tarball = shlex.split(pipe[1])[-1]
  assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all",
                     *gflags, tarball, "my-tpu:/tmp/coder_jax_src.tar.gz"]
  assert cmds[3] == ["rm", "-f", tarball]
  ssh = [c for c in cmds if c[4:5] == ["ssh"]]
  assert len(ssh) == 3  # untar, setup, run
  for c in ssh:
    assert c[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *gflags]
    assert c[10:12] == ["--worker=all", "--command"] and len(c) == 13
  assert "tar -xzf /tmp/coder_jax_src.tar.gz" in ssh[0][12]
  setup = ssh[1][12]
  assert "scripts/setup.sh requirements.txt" in setup and "jax[tpu]" in setup
  run = shlex.split(ssh[2][12])
  assert run[:6] == ["cd", "$HOME/coder_jax", "&&", "CODER_JAX_DISTRIBUTED=1", "PYTHONPATH=.",
                     ".venv/bin/python"]
  assert main_args(run) == ARGS


def test_tpu_dry_run_without_create_or_setup():
  lines = dry("tpu_vm.sh", ["--tpu", "t", "--zone", "z", "--", *ARGS])
  assert len(lines) == 5
  assert not any(" create " in line or "setup.sh" in line for line in lines)
  assert "--project" not in lines[-1]


def test_tpu_remote_commands_run(tmp_path):
  """The printed tar pipeline packs the tree; the remote run command, run by a shell whose
  $HOME holds a fake repo, passes the arguments through intact."""
  lines = dry("tpu_vm.sh", ["--tpu", "t", "--zone", "z", *ARGS], TMPDIR=str(tmp_path))
  subprocess.run(["bash", "-c", lines[0]], check=True, capture_output=True)
  tarball = shlex.split(lines[0].split(" | ")[1])[-1]
  with tarfile.open(tarball) as tf:
    names = set(tf.getnames())
  assert {"README.md", "launch/tpu_vm.sh", "tests/test_launch.py"} <= names
  assert not any(n.startswith(".venv/") or n.startswith(".git/") for n in names)

  repo = fake_repo(tmp_path / "coder_jax")
  command = shlex.split(lines[-1])[-1]
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FAKE_OUT": str(tmp_path)}
  subprocess.run(["bash", "-c", command], check=True, env=env)
  rec = json.loads((tmp_path / "proc.json").read_text())
  assert rec["argv"] == ["-m", "coder_jax.main", *ARGS]
  assert rec["cwd"] == str(repo)
  assert rec["env"] == {"CODER_JAX_DISTRIBUTED": "1", "PYTHONPATH": "."}


def test_tpu_real_run_with_stub_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  write_exe(bin_dir / "gcloud", f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
""")
  r = launch("tpu_vm.sh", ["--tpu", "t", "--zone", "z", "--repo_dir", "/srv/my repo", *ARGS],
             PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [c[3] for c in calls] == ["scp", "ssh", "ssh"]
  assert shlex.split(calls[1][-1])[:3] == ["mkdir", "-p", "/srv/my repo"]
  assert main_args(shlex.split(calls[2][-1])) == ARGS
  assert not list(tmp_path.glob("coder_jax_src.*"))  # the local tarball is removed


@pytest.mark.parametrize("args, message", [
  (["--zone", "z", *ARGS], "missing --tpu"),
  (["--tpu", "t", *ARGS], "missing --zone"),
  (["--tpu", "t", "--zone", "z"], "no --gin_file"),
  (["--zone", "z", "--tpu"], "--tpu needs a value"),
  (["--tpu", "t", "--zone", "z", "--create=yes", *ARGS], "--create takes no value"),
])
def test_tpu_bad_options_exit_2(args, message):
  r = launch("tpu_vm.sh", args, DRY_RUN="1")
  assert r.returncode == 2 and message in r.stderr and not r.stdout


# ---------------------------------------------------------------------------------- slurm.sh

def split_sbatch_dry_run(lines):
  """-> (script path, script lines, the commands after the here-document)."""
  head = shlex.split(lines[0])
  assert head[:2] == ["cat", ">"] and lines[0].endswith("<<'CODER_JAX_SBATCH_EOF'")
  end = lines.index("CODER_JAX_SBATCH_EOF")
  return head[2], lines[1:end], lines[end + 1:]


def test_slurm_dry_run_script():
  lines = dry("slurm.sh", ["--nodes", "4", "--partition=gpu", "--account", "acct", "--time",
                           "48:00:00", "--port", "23458", "--log_dir", "/shared/logs", *ARGS])
  path, script, cmds = split_sbatch_dry_run(lines)
  assert script[0] == "#!/usr/bin/env bash"
  sbatch = [line for line in script if line.startswith("#SBATCH ")]
  assert sbatch == ["#SBATCH --job-name=coder_jax", "#SBATCH --nodes=4",
                    "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                    "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=acct",
                    "#SBATCH --output=/shared/logs/%x-%j.out"]
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in "\n".join(script)
  assert any(":23458" in line and "CODER_JAX_COORDINATOR" in line for line in script)
  srun = [shlex.split(line) for line in script if line.startswith("srun ")]
  assert len(srun) == 1
  assert srun[0][0] == "srun" and srun[0][-3:-1] == ["bash", "-c"]
  task = srun[0][-1]
  assert '"$SLURM_PROCID"' in task and '"$SLURM_NTASKS"' in task
  tokens = shlex.split(task)
  assert "CODER_JAX_PROCESS_ID=$SLURM_PROCID" in tokens
  assert "CODER_JAX_NUM_PROCESSES=$SLURM_NTASKS" in tokens
  assert main_args(tokens) == ARGS
  assert [shlex.split(c) for c in cmds] == [["mkdir", "-p", "/shared/logs"], ["sbatch", path]]
  subprocess.run(["bash", "-n"], input="\n".join(script), text=True, check=True)


def test_slurm_script_runs_per_task(tmp_path):
  """Run the generated script with stub scontrol/srun: the coordinator is the first node and the
  task variables come from each task's environment, not from the submitting shell."""
  repo = fake_repo(tmp_path / "repo dir")
  out = tmp_path / "script.sbatch"
  lines = dry("slurm.sh", ["--nodes", "2", "--port", "23459", "--repo_dir", str(repo),
                           "--log_dir", str(tmp_path / "logs"), "--script_out", str(out), *ARGS])
  path, script, _ = split_sbatch_dry_run(lines)
  assert path == str(out) and not out.exists()  # a dry run writes nothing
  out.write_text("\n".join(script) + "\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
  write_exe(bin_dir / "srun", """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
SLURM_NTASKS=2 SLURM_PROCID=1 exec "$@"
""")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_OUT": str(tmp_path),
         "SLURM_JOB_NODELIST": "node-[a-b]"}
  subprocess.run(["bash", str(out)], check=True, env=env, capture_output=True)
  rec = json.loads((tmp_path / "proc1.json").read_text())
  assert rec["argv"] == ["-m", "coder_jax.main", *ARGS]
  assert rec["cwd"] == str(repo)
  assert rec["env"] == {"CODER_JAX_COORDINATOR": "node-a:23459", "CODER_JAX_NUM_PROCESSES": "2",
                        "CODER_JAX_PROCESS_ID": "1", "PYTHONPATH": "."}


def test_slurm_real_submit_with_stub_sbatch(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  submitted = tmp_path / "submitted.sbatch"
  write_exe(bin_dir / "sbatch", f"""#!/usr/bin/env bash
cp "$1" {shlex.quote(str(submitted))}
echo "Submitted batch job 7"
""")
  args = ["--nodes", "2", "--log_dir", str(tmp_path / "logs"), *ARGS]
  r = launch("slurm.sh", args, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert "Submitted batch job 7" in r.stdout
  assert (tmp_path / "logs").is_dir()
  _, script, _ = split_sbatch_dry_run(dry("slurm.sh", args))
  assert submitted.read_text() == "\n".join(script) + "\n"
  assert not list(tmp_path.glob("coder_jax.sbatch.*"))  # the temp script is removed


@pytest.mark.parametrize("args, message", [
  (ARGS, "missing --nodes"),
  (["--nodes", "two", *ARGS], "--nodes must be a positive integer"),
  (["--nodes", "2", "--port", "http", *ARGS], "--port"),
  (["--nodes", "2"], "no --gin_file"),
  (["--nodes"], "--nodes needs a value"),
])
def test_slurm_bad_options_exit_2(args, message):
  r = launch("slurm.sh", args, DRY_RUN="1")
  assert r.returncode == 2 and message in r.stderr and not r.stdout
