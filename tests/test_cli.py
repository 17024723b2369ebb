"""coder_jax/cli.py: one user-error rule for every command line, and native start-up noise kept
out of their output (unless CODER_JAX_VERBOSE) without losing real errors, even in a crash."""

import os
import re
import subprocess
import sys

import pytest

from coder_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines as TensorFlow 2.21 / XLA / absl print them while starting on a CPU-only machine.
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796161102.708986   24689 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1796161102.710154   24689 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796161102.9 24689 cuda_executor.cc:1309] INTERNAL: CUDA error: Failed call to "
    "cuInit: UNKNOWN ERROR (303)",
    "W0000 00:00:1796161103.1 24690 cache_dataset_ops.cc:916] The calling iterator did not fully "
    "read the dataset being cached.",
]
REAL = [
    "E0000 00:00:1796161103.2 24689 some_op.cc:12] INTERNAL: the disk is full",
    "W0000 00:00:1796161103.3 24689 other.cc:7] a warning that is not start-up noise",
]


def test_noise_patterns_match_the_noise_only():
  assert all(cli.is_noise(l) for l in NOISE)
  assert not any(cli.is_noise(l) for l in REAL)
  assert not cli.is_noise("[#####.....] 5/10  loss 2.000  ETA 0:00:10")


def _run(body, env_extra=None):
  code = ("import os, sys\nfrom coder_jax.cli import quiet_native_logs\n"
          "print('filtering', quiet_native_logs(), file=sys.stderr, flush=True)\n" + body)
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env.update(PYTHONPATH=REPO, **(env_extra or {}))
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)


_WRITE = ("lines = {lines!r}\n"
          "os.write(2, ''.join(l + '\\n' for l in lines).encode())\n"
          "print('a python line', file=sys.stderr)\n")


def test_native_noise_is_filtered_real_lines_pass():
  res = _run(_WRITE.format(lines=NOISE + REAL))
  assert res.returncode == 0, res.stderr
  err = res.stderr.splitlines()
  assert err[0] == "filtering True"
  assert not [l for l in err if cli.is_noise(l)], err
  assert [l for l in err if l in REAL] == REAL and "a python line" in err


def test_verbose_env_shows_everything():
  res = _run(_WRITE.format(lines=NOISE + REAL), {cli.VERBOSE_ENV: "1"})
  err = res.stderr.splitlines()
  assert err[0] == "filtering False" and [l for l in err if l in NOISE + REAL] == NOISE + REAL


def test_a_crash_loses_none_of_its_last_words():
  # The filter is a process of its own: what a dying process wrote still arrives, even a last
  # line without a newline.
  res = _run(_WRITE.format(lines=NOISE + REAL)
             + "os.write(2, b'F0000 check failed: x != y')\nos.abort()\n")
  assert res.returncode != 0
  assert res.stderr.endswith("F0000 check failed: x != y"), res.stderr
  assert REAL[0] in res.stderr and not any(n in res.stderr for n in NOISE)


def test_tensorflow_start_up_is_quiet():
  res = _run("import tensorflow as tf\nprint(int(tf.constant(2) * 3))\n"
             + _WRITE.format(lines=REAL))
  assert res.returncode == 0 and res.stdout.strip() == "6", res.stderr
  # Exactly these lines: TensorFlow's start-up notices are gone. The native lines pass through
  # the filter process and keep their order; Python's own line is written past it, so where it
  # lands among them is up to the scheduler.
  err = res.stderr.splitlines()
  assert err[0] == "filtering True", res.stderr
  assert sorted(err[1:]) == sorted(REAL + ["a python line"]), res.stderr
  assert [l for l in err if l in REAL] == REAL, res.stderr


@pytest.mark.parametrize("module, argv", [
    ("coder_jax.hf.__main__", ["import", "--hf_dir", "/nonexistent/hf", "--out", "/tmp/x"]),
    ("coder_jax.data.__main__", ["show", "--data_dir", "/nonexistent/data"]),
    ("coder_jax.data.chat_cli", ["--data", "/nonexistent/chat.jsonl", "--tokenizer",
                                 "/nonexistent/tokenizer.json"]),
])
def test_every_command_line_reports_user_errors_the_same_way(module, argv, capsys):
  import importlib
  assert importlib.import_module(module).main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.match(r"error: \w+Error: \S", err), err


def test_exit_status_leaves_programming_errors_alone():
  def boom(argv):
    raise KeyError("a bug, not a user error")
  with pytest.raises(KeyError):
    cli.exit_status(boom)
  assert cli.exit_status(lambda argv: None) == 0
