"""The caller's side: capability detection, check() and check_many().

Each check launches a fresh interpreter (_harness.py) with subprocess, which forks+execs in C
without running Python code in the child; the caller (a JAX process) is never forked by us.
check_many runs checks from a bounded thread pool, each thread waiting on its own interpreter.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from coder_jax.sandbox import _cgroup
from coder_jax.sandbox.limits import (STATUSES, Limits, Result, SandboxError, SandboxUnavailable,
                                      check_seconds)

log = logging.getLogger("coder_jax.sandbox")

ENV_ISOLATION = "CODER_JAX_SANDBOX_ISOLATION"  # "namespaces" | "rlimits" | "auto"
MODES = ("namespaces", "rlimits")
_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
_GRACE_S = 2.0  # caller-side backstop past the wall limit (interpreter start, mounts, teardown)
_DRAIN_S = 0.5  # after the verdict, how long to let stdout/stderr reach EOF
_NOBODY = 65534
_SYSTEM_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Of /etc only what programs use, never all of it: machine-wide settings there (pip.conf, npmrc,
# gitconfig, ssh, hosts) can name private indexes and hosts or hold tokens. Dynamic linking of
# what the program runs or loads late; local time; account names for pwd/grp (shadow stays out);
# mimetypes; the targets of /usr/bin links such as awk.
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
        "nsswitch.conf", "mime.types", "alternatives")

_caps_lock = threading.Lock()
_caps: dict = {}
_warned = set()


def _python() -> str:
  # The base interpreter, not a venv's: the sandbox sees its stdlib (bound read-only) only.
  return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _others_can_run(exe: str) -> bool:
  """Whether uid 65534 can run `exe` and read its prefix (e.g. not under a 0700 /root)."""
  prefix = os.path.dirname(os.path.dirname(exe))
  try:
    if not os.stat(exe).st_mode & 0o005 == 0o005:
      return False
    path = os.path.join(prefix, "lib")
    while True:
      if not os.stat(path).st_mode & 0o001:
        return False
      if path == "/":
        return True
      path = os.path.dirname(path)
  except OSError:
    return False


def _rlimits_python() -> str | None:
  """The rlimits mode runs a root caller's programs as uid 65534: it needs an interpreter that
  uid can read. Non-root callers run programs as themselves."""
  base = _python()
  if os.geteuid() != 0:
    return base
  for exe in (base, "/usr/bin/python3", "/usr/local/bin/python3"):
    exe = os.path.realpath(exe)
    if os.path.isfile(exe) and _others_can_run(exe):
      return exe
  return None


def _ro_paths(python: str) -> list[str]:
  """What the namespaces mode binds read-only into the new root (besides /dev, /proc and the
  scratch tmpfs): system directories, a few /etc files, and the interpreter's install tree, not
  the directories above it (e.g. not $HOME when pyenv installed it there)."""
  paths = [p for p in _SYSTEM_RO + tuple(f"/etc/{n}" for n in _ETC) if os.path.lexists(p)]
  for extra in (os.path.realpath(sys.base_prefix), os.path.dirname(python)):
    if not any(extra == p or extra.startswith(p + "/") for p in paths):
      paths.append(extra)
  return paths


def _probe(mode: str, cgroup: str | None, python: str) -> tuple[str, dict | None]:
  """Runs a trivial check in `mode`: ("", facts) where it works, else (why not, None)."""
  fd, sentinel = tempfile.mkstemp(prefix="coder_jax_sbx_probe_")
  os.close(fd)
  test = ("import json, os, subprocess\n"  # imports: the interpreter's stdlib is readable
          f"print(json.dumps({{'uid': os.getuid(), 'sees_host_tmp': os.path.exists({sentinel!r})}}))\n")
  try:
    r = _run_one("", test, Limits(wall_s=10.0), mode, None, cgroup, python)
  except OSError as e:
    return f"{mode} probe: {e}", None
  finally:
    os.unlink(sentinel)
  if not r.passed:
    return f"{mode} probe {r.status}: {r.detail} {r.stderr[-300:]}".strip(), None
  facts = json.loads(r.stdout.splitlines()[0])
  if mode == "namespaces" and facts["sees_host_tmp"]:
    return "namespaces probe: the host's /tmp is visible inside", None
  return "", facts


def capabilities() -> dict:
  """What this machine supports (probed once per process, then cached)."""
  with _caps_lock:
    if not _caps:
      version, memory, cg_reason = _cgroup.probe()
      ns_why, ns = _probe("namespaces", version, _python())
      rl_python = _rlimits_python()
      rl_why, rl = ("no interpreter that uid 65534 can read", None) if rl_python is None \
        else _probe("rlimits", version, rl_python)
      _caps.update(
        namespaces=ns is not None, namespaces_reason=ns_why or "user, mount, net, pid, ipc and "
        "uts namespaces work", rlimits=rl is not None, rlimits_reason=rl_why or "works",
        cgroup=version, memory_cap=memory, cgroup_reason=cg_reason, python=_python(),
        python_rlimits=rl_python,
        # RLIMIT_NPROC binds only non-root host uids: the namespace's 65534 or a non-root caller.
        ns_worker_host_uid=(_NOBODY if ns["uid"] == _NOBODY else os.geteuid()) if ns else None)
    caps = dict(_caps)
  caps["isolation"] = _default_mode(caps)
  caps["process_cap"] = {m: _process_cap(m, caps) for m in MODES}
  return caps


def _default_mode(caps: dict) -> str:
  req = os.environ.get(ENV_ISOLATION, "auto") or "auto"
  if req not in MODES + ("auto",):
    raise ValueError(f"{ENV_ISOLATION} must be one of {MODES + ('auto',)}, got {req!r}")
  if req == "auto":
    return "namespaces" if caps["namespaces"] else "rlimits"
  return req


def isolation_mode() -> str:
  """The mode check() uses here by default: "namespaces" where they work, else "rlimits"
  (or what CODER_JAX_SANDBOX_ISOLATION forces)."""
  return capabilities()["isolation"]


def _process_cap(mode: str, caps: dict) -> str | None:
  """How the number of processes is capped in `mode`, or None (then we refuse to run)."""
  layers = ["cgroup pids.max"] if caps["cgroup"] else []
  if mode == "namespaces":
    if caps["ns_worker_host_uid"] not in (None, 0):
      layers.append("RLIMIT_NPROC (per user namespace)")
  elif not layers:  # the worker runs as 65534 (root caller) or as the caller: never uid 0
    layers.append("RLIMIT_NPROC (host-wide count for the worker's uid)")
  return " + ".join(layers) or None


def _count_tasks(uid: int) -> int:
  """Threads of `uid` on this host: RLIMIT_NPROC counts them all, not just ours."""
  n = 0
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      if int(fields["Uid"].split()[0]) == uid:
        n += int(fields["Threads"])
    except (OSError, KeyError, ValueError):
      pass
  return n


def _warn_fallback(why: str) -> None:
  if why not in _warned:
    _warned.add(why)
    log.warning("coder_jax.sandbox: running untrusted code WITHOUT namespace isolation (%s). "
                "Mode 'rlimits': own process group, rlimits, temp dir, cgroup if available, "
                "uid 65534 if root; no filesystem, network or pid isolation.", why)


def _resolve(isolation: str | None) -> tuple[str, dict]:
  caps = capabilities()
  if isolation is None:
    mode = caps["isolation"]
    forced = os.environ.get(ENV_ISOLATION, "auto") not in ("", "auto")
    why = f"forced by {ENV_ISOLATION}" if forced else caps["namespaces_reason"]
  elif isolation in MODES:
    mode, why = isolation, "forced by isolation='rlimits'"
  else:
    raise ValueError(f"isolation must be one of {MODES} or None, got {isolation!r}")
  if not caps[mode]:
    raise SandboxUnavailable(f"{mode} isolation is unavailable: {caps[mode + '_reason']}")
  if _process_cap(mode, caps) is None:
    # A fork bomb without a cap takes the host down: refuse rather than run unbounded.
    raise SandboxUnavailable(
      f"no process cap in mode {mode!r} (no writable pids cgroup: {caps['cgroup_reason']}; "
      "RLIMIT_NPROC does not bind uid 0); refusing to run untrusted code")
  if mode == "rlimits":
    _warn_fallback(why)
  return mode, caps


def _mode_python(mode: str, caps: dict) -> str:
  return caps["python"] if mode == "namespaces" else caps["python_rlimits"]


class _Capped:
  """Keeps the first `cap` bytes of a stream, counts the rest, never holds more."""

  def __init__(self, cap: int):
    self.cap, self.data, self.total = cap, bytearray(), 0

  def feed(self, chunk: bytes) -> None:
    self.total += len(chunk)
    room = self.cap - len(self.data)
    if room > 0:
      self.data += chunk[:room]

  def text(self) -> str:
    return self.data.decode("utf-8", "replace")


def _run_one(program, test, limits: Limits, mode: str, tag, cgroup, python: str) -> Result:
  t0 = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="coder_jax_sbx_")
  nonce = secrets.token_hex(16)
  proc, cg, vr, vw = None, None, -1, -1
  out, err, verdict_raw = _Capped(limits.output_bytes), _Capped(limits.output_bytes), _Capped(1 << 20)
  oom = pid_hits = 0
  timed_out = False
  try:
    paths = {"program_path": os.path.join(workdir, "solution.py"),
             "test_path": os.path.join(workdir, "test_solution.py")}
    for key, text in (("program_path", program), ("test_path", test)):
      with open(paths[key], "w", encoding="utf-8") as f:
        f.write(text)
    root = os.geteuid() == 0
    nproc = None
    if mode == "namespaces":
      nproc = limits.max_processes  # counted per user namespace: only this run's tasks
    elif cgroup is None:  # host-wide count: only as the last resort
      nproc = _count_tasks(_NOBODY if root else os.geteuid()) + limits.max_processes
    if mode == "rlimits" and root:
      os.chown(workdir, _NOBODY, _NOBODY)
    if cgroup is not None:  # + the harness's own tasks (S; C and P in the namespaces mode)
      cg = _cgroup.create(limits.max_processes + (3 if mode == "namespaces" else 1),
                          limits.memory_cap_bytes())
    vr, vw = os.pipe()
    cfg = dict(paths, mode=mode, workdir=workdir, verdict_fd=vw, wall_s=limits.wall_s,
               cpu_s=limits.cpu_limit_s, limits=dataclasses.asdict(limits), nproc=nproc,
               drop_uid=_NOBODY if root else None, nice=limits.nice, tag=tag,
               ro_paths=_ro_paths(python))
    cmd = [python, "-I", "-S", _HARNESS] + ([f"--tag={tag}"] if tag else [])
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if tag:
      env["CODER_JAX_SANDBOX_TAG"] = tag
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(vw,), cwd=workdir, env=env,
                            start_new_session=True)
    os.close(vw)
    vw = -1
    if cg is not None:  # before S reads its config, i.e. before it forks anything
      cg.add(proc.pid)
    blob = marshal.dumps(cfg)  # only our harness reads it; marshal needs no imports there
    try:
      proc.stdin.write(len(blob).to_bytes(4, "big") + blob + nonce.encode())
      proc.stdin.close()
    except BrokenPipeError:
      pass
    sel = selectors.DefaultSelector()
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, vr: verdict_raw}
    for fd in sinks:
      sel.register(fd, selectors.EVENT_READ)
    deadline = t0 + limits.wall_s + _GRACE_S
    verdict_at = None
    while sel.get_map():
      now = time.monotonic()
      end = deadline if verdict_at is None else min(deadline, verdict_at + _DRAIN_S)
      if now >= end:
        timed_out = verdict_at is None
        break
      for key, _ in sel.select(end - now):
        chunk = os.read(key.fd, 1 << 16)
        if chunk:
          sinks[key.fd].feed(chunk)
        else:
          sel.unregister(key.fd)
          if key.fd == vr:
            verdict_at = time.monotonic()
    sel.close()
    if cg is not None:
      oom, pid_hits = cg.oom_kills(), cg.pids_max_hits()
  finally:
    if proc is not None:
      try:  # S is not reaped yet, so its pid (= the group id) cannot have been reused
        os.killpg(proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    if cg is not None:
      cg.destroy()
    if proc is not None:
      proc.wait()
      proc.stdout.close()
      proc.stderr.close()
    for fd in (vr, vw):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
  return _result(verdict_raw, nonce, timed_out, oom, pid_hits, limits, mode, out, err,
                 time.monotonic() - t0, workdir)


def _result(raw, nonce, timed_out, oom, pid_hits, limits, mode, out, err, wall, workdir):
  v = None
  try:
    v = json.loads(bytes(raw.data)) if raw.data else None
  except ValueError:
    pass
  common = dict(isolation=mode, stdout=out.text(), stderr=err.text(), wall_s=wall,
                stdout_truncated=out.total > len(out.data),
                stderr_truncated=err.total > len(err.data), workdir=workdir)
  if timed_out:
    return Result("timeout", detail=f"no verdict within the wall limit ({limits.wall_s:g} s) "
                  f"+ {_GRACE_S:g} s", **common)
  if (not isinstance(v, dict) or v.get("status") not in STATUSES
      or not secrets.compare_digest(str(v.get("nonce", "")).encode(), nonce.encode())):
    return Result("error", detail="no valid verdict from the harness", **common)
  # Never an empty detail: a harness error whose message is empty still says which status.
  status, detail = v["status"], v.get("detail") or f"{v['status']} (the harness gave no reason)"
  if not v.get("completed") and status in ("failed", "killed") and oom:
    status, detail = "killed", "memory limit (cgroup OOM kill)"
  elif oom and status != "passed":
    detail += f" (the cgroup OOM-killed {oom} process(es))"
  if pid_hits and status != "passed":
    detail += f" (process limit {limits.max_processes} reached {pid_hits}x)"
  return Result(status, detail=detail, exception=v.get("exception"),
                traceback=v.get("traceback") or "", cpu_s=v.get("cpu_s"), **common)


def _limits(limits: Limits | None, timeout_s) -> Limits:
  if limits is None:
    limits = Limits()
  elif not isinstance(limits, Limits):
    raise TypeError(f"limits must be a sandbox.Limits, got {type(limits).__name__}")
  if timeout_s is not None:
    limits = dataclasses.replace(limits, wall_s=check_seconds("timeout_s", timeout_s))
  return limits


def _unrunnable(name: str, value) -> str:
  """Why the str `value` cannot be handed to an interpreter, e.g. "contains a NUL byte ..."
  ("" when it can). A non-str raises TypeError naming `name`: that is the caller's bug, not a
  property of generated text."""
  if not isinstance(value, str):
    raise TypeError(f"{name} must be a str of Python source, got {type(value).__name__}")
  nul = value.find("\x00")
  if nul >= 0:
    return f"contains a NUL byte (at offset {nul})"
  try:
    value.encode("utf-8")  # the files we write, and the interpreter's source decoding, need it
  except UnicodeEncodeError as e:
    return (f"contains a lone surrogate U+{ord(value[e.start]):04X} (at offset {e.start}), "
            "which is not UTF-8 text")
  return ""


def _code(name: str, value) -> str:
  why = _unrunnable(name, value)
  if why:
    raise ValueError(f"{name} {why}")
  return value


def check(program: str, test: str, timeout_s: float | None = None, *,
          limits: Limits | None = None, isolation: str | None = None,
          tag: str | None = None) -> Result:
  """Runs `program`, then `test` in the same namespace, sandboxed; returns the verdict.

  timeout_s: wall limit in seconds (default: limits.wall_s, 10 s). isolation: None (best
  available), "namespaces" or "rlimits". tag: a string put in the sandbox processes' command
  line and environment, to find them in ps. Raises SandboxUnavailable where no process cap exists.
  """
  limits = _limits(limits, timeout_s)
  program, test = _code("program", program), _code("test", test)
  if tag is not None and (not isinstance(tag, str) or not tag.isprintable() or len(tag) > 200):
    raise ValueError(f"tag must be a printable str of <= 200 chars, got {tag!r}")
  mode, caps = _resolve(isolation)
  return _run_one(program, test, limits, mode, tag, caps["cgroup"], _mode_python(mode, caps))


def check_many(items, max_workers: int | None = None, timeout_s: float | None = None, *,
               limits: Limits | None = None, isolation: str | None = None,
               tag: str | None = None) -> list[Result]:
  """check() over (program, test) pairs, at most `max_workers` (default: CPU count) at once.

  Results come back in input order. One bad item never costs the others: a program that cannot
  run at all (a NUL byte, a lone surrogate) is "failed" with the reason in its detail, as a
  syntax error would be; such a test is "error" (the caller's test is broken); a check the
  sandbox itself could not run (e.g. out of file descriptors) is "error". Only a malformed call
  (an item that is no pair, a non-str program) raises.
  """
  pairs, rejected = [], {}
  for i, item in enumerate(items):
    if isinstance(item, dict):
      item = (item.get("program"), item.get("test"))
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise TypeError(f"items[{i}] must be a (program, test) pair or a dict with those keys")
    why_program = _unrunnable(f"items[{i}] program", item[0])
    why_test = _unrunnable(f"items[{i}] test", item[1])
    if why_program:
      rejected[i] = ("failed", f"not run: the program {why_program}")
    elif why_test:
      rejected[i] = ("error", f"not run: the test {why_test}")
    pairs.append(item)
  if max_workers is None:
    max_workers = os.cpu_count() or 1
  if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
    raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
  limits = _limits(limits, timeout_s)
  if not pairs:
    return []
  mode, caps = _resolve(isolation)
  python = _mode_python(mode, caps)

  def one(i):
    if i in rejected:
      status, why = rejected[i]
      return Result(status, isolation=mode, detail=why)
    try:
      return _run_one(pairs[i][0], pairs[i][1], limits, mode, tag, caps["cgroup"], python)
    except (OSError, SandboxError) as e:
      return Result("error", isolation=mode, detail=f"sandbox failure: {e}")

  with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(pairs)),
                                             thread_name_prefix="coder_jax_sandbox") as pool:
    return list(pool.map(one, range(len(pairs))))
