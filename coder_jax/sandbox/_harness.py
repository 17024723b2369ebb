"""Sandbox harness: the fresh interpreter the caller launches for one check.

    python -I -S _harness.py [--tag=T]     (config, then the nonce, on stdin)

It is a separate program (launched with subprocess, i.e. fork+exec in C) so the caller, a JAX
process with many threads, is never forked; every fork below happens in this small
single-threaded interpreter. Process tree in the namespaces mode:

  caller -> S  supervisor; host namespaces; already inside the run's cgroup; holds the nonce
    S -> C     unshare(user, mount, net, pid, ipc, uts); S writes C's uid/gid maps
      C -> P   pid 1 of the new pid namespace: builds a read-only root, reaps, enforces wall time
        P -> W uid 65534 (or root without capabilities), rlimits; runs program + test (_worker)

In the rlimits mode S forks W directly. Channels: stdin -> S: a length-prefixed config, then the
32-byte nonce, which S reads only after forking (so no descendant's memory ever holds it); W -> S:
the completion record (done pipe); P -> S: W's wait status and usage (info pipe); S -> caller:
the verdict, carrying the nonce, on the fd named in the config. W's stdout/stderr are the
caller's pipes. Every process that exists before untrusted code runs has PR_SET_PDEATHSIG, so the
whole tree dies with S, and the caller kills S's process group and the cgroup afterwards.
"""

import _signal as signal  # the C module: `signal` imports enum, ~5 ms on every check
import marshal
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # -I leaves the script's directory off sys.path

import _linux  # noqa: E402
import _worker  # noqa: E402

NS_FLAGS = (_linux.CLONE_NEWUSER | _linux.CLONE_NEWNS | _linux.CLONE_NEWNET | _linux.CLONE_NEWPID
            | _linux.CLONE_NEWIPC | _linux.CLONE_NEWUTS)
NOBODY = 65534
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _read_exact(fd, n):
  buf = b""
  while len(buf) < n:
    chunk = os.read(fd, n - len(buf))
    if not chunk:
      raise EOFError("config pipe closed early")
    buf += chunk
  return buf


def _read_available(fd, cap=1 << 16):
  """What is in the pipe now: survivors may hold the write end open, so never wait for EOF."""
  os.set_blocking(fd, False)
  buf = b""
  while len(buf) < cap:
    try:
      chunk = os.read(fd, cap - len(buf))
    except BlockingIOError:
      break
    if not chunk:
      break
    buf += chunk
  return buf


def _report(fd, obj):
  try:
    os.write(fd, marshal.dumps(obj))  # trusted writer (P) to trusted reader (S)
  except OSError:
    pass


class _WallTime(Exception):
  pass


def _on_alarm(signum, frame):
  raise _WallTime()


def start_wall_clock(wall_s):
  """Arms the wall limit before the program is forked, so it counts the program's whole life
  even when this process is slow to reach supervise() (under load, a short program once ended
  before the clock started and passed a 1e-6 s limit). SIGALRM stays blocked until supervise()
  waits, so the alarm cannot interrupt anything else here."""
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
  signal.signal(signal.SIGALRM, _on_alarm)
  signal.setitimer(signal.ITIMER_REAL, wall_s)


def program_signals():
  """In the forked program: SIGALRM as in any fresh process (fork does not copy the itimer)."""
  signal.signal(signal.SIGALRM, signal.SIG_DFL)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def supervise(pid, wall_s):
  """Waits for `pid` (forked after start_wall_clock), reaping every other child meanwhile;
  SIGKILLs it at the wall limit."""
  t0 = time.monotonic()
  timed_out, status, usage = False, None, None
  # Unblocked inside the try, disarmed in an inner finally: an alarm already due lands at the
  # unblock, and one whose handler runs just after the disarm still lands in `except _WallTime`
  # (it once escaped as an "error" with an empty message).
  try:
    try:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
      while status is None:
        p, st, ru = os.wait4(-1, 0)
        if p == pid:
          status, usage = st, ru
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  except _WallTime:
    timed_out = status is None  # an alarm just after the program ended is no timeout
  except ChildProcessError:
    pass
  if status is None:
    try:
      os.kill(pid, signal.SIGKILL)
      _, status, usage = os.wait4(pid, 0)
    except (ProcessLookupError, ChildProcessError):
      status = 0
  info = {"wstatus": status, "timed_out": timed_out, "run_s": time.monotonic() - t0}
  if usage is not None:
    info["cpu_s"] = usage.ru_utime + usage.ru_stime
    info["maxrss_kb"] = usage.ru_maxrss
  return info


def _write_maps(pid):
  """Maps root, and where we may (real root), uid/gid 65534 for the worker to drop to."""
  def put(name, text):
    with open(f"/proc/{pid}/{name}", "w") as f:
      f.write(text)
  if os.geteuid() == 0:
    try:
      put("uid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
      put("gid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
      return True
    except OSError:
      pass  # e.g. root of a container whose own map lacks 65534: one-uid map below
  put("setgroups", "deny")
  put("uid_map", f"0 {os.geteuid()} 1\n")
  put("gid_map", f"0 {os.getegid()} 1\n")
  return False


def _bind_ro(src, dst, extra=_linux.MS_NOSUID | _linux.MS_NODEV):
  _linux.mount(src, dst, None, _linux.MS_BIND)
  _linux.remount_readonly(dst, extra)


def _build_root(cfg):
  """A new root on a tmpfs holding read-only binds of the system and the interpreter only."""
  L = _linux
  L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)  # nothing below propagates to the host
  new = cfg["workdir"]  # an empty host directory we own serves as the mount point
  L.mount("tmpfs", new, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "size=1m,mode=0755")
  for path in cfg["ro_paths"]:
    dst = new + path
    # The directories above a bound path (/root/.pyenv/versions above pyenv's interpreter) are
    # made here, on the tmpfs: they hold that one entry, nothing of the host directory.
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems, /etc/localtime -> ...
      os.symlink(os.readlink(path), dst)
    elif os.path.isdir(path):
      os.makedirs(dst, exist_ok=True)
      _bind_ro(path, dst)
    elif os.path.isfile(path):  # /etc/passwd, ...: an empty file as the mount point
      open(dst, "w").close()
      _bind_ro(path, dst)
  dev = new + "/dev"
  os.makedirs(dev, exist_ok=True)
  L.mount("tmpfs", dev, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC, "size=64k,mode=0755")
  for name in _DEVICES:
    open(f"{dev}/{name}", "w").close()
    _bind_ro(f"/dev/{name}", f"{dev}/{name}", L.MS_NOSUID | L.MS_NOEXEC)
  for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, f"{dev}/{name}")
  scratch = f"size={cfg['limits']['scratch_bytes']}"
  for path, mode in (("/dev/shm", "1777"), ("/tmp", "1777"), (cfg["workdir"], "0700")):
    os.makedirs(new + path, exist_ok=True)
    L.mount("tmpfs", new + path, "tmpfs", L.MS_NOSUID | L.MS_NODEV, f"{scratch},mode={mode}")
  L.remount_readonly(dev, L.MS_NOSUID | L.MS_NOEXEC)
  if cfg["drop_uid"] is not None:
    os.chown(new + cfg["workdir"], cfg["drop_uid"], cfg["drop_uid"])
  os.makedirs(new + "/proc", exist_ok=True)
  # This process is pid 1 of the new pid namespace: the proc mounted here shows only the sandbox.
  L.mount("proc", new + "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
  os.chdir(new)
  L.pivot_root(".", ".")  # the old root ends up stacked on "/" ...
  L.umount2(".", L.MNT_DETACH)  # ... and is detached: nothing of the host tree is reachable
  os.chdir("/")
  L.mount(None, "/", None, L.MS_REMOUNT | L.MS_BIND | L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV)
  try:  # no nested user namespaces: less kernel surface for the program (best effort)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
      f.write("0")
  except OSError:
    pass


def _init(cfg, program, test, done_w, info_w):
  """P: pid 1 of the sandbox. Never returns."""
  try:
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    _build_root(cfg)
    start_wall_clock(cfg["wall_s"])
    w = os.fork()
    if w == 0:
      program_signals()
      os.close(info_w)
      _worker.run(cfg, program, test)
    os.close(done_w)
    info = supervise(w, cfg["wall_s"])
  except BaseException as e:
    info = {"error": f"sandbox init: {type(e).__name__}: {e}"}
  _report(info_w, info)
  os._exit(0)  # pid 1 exits: the kernel kills whatever the program left in the namespace


def _spawn_namespaced(cfg, program, test, done_w, info_w, parent_only):
  sync_r, sync_w = os.pipe()
  go_r, go_w = os.pipe()
  pid = os.fork()
  if pid == 0:  # C
    try:
      for fd in parent_only + [sync_r, go_w]:
        os.close(fd)
      _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
      # S is not dumpable, which makes /proc/<C> root's; a non-root S could not write our maps.
      _linux.prctl(_linux.PR_SET_DUMPABLE, 1)
      _linux.unshare(NS_FLAGS)
      os.write(sync_w, b"u")
      answer = os.read(go_r, 1)
      if answer not in (b"0", b"1"):
        raise OSError("supervisor could not write the uid/gid maps")
      cfg["drop_uid"] = NOBODY if answer == b"1" else None
      p = os.fork()
      if p == 0:
        _init(cfg, program, test, done_w, info_w)
      os.close(done_w)
      os.close(info_w)
      os.waitpid(p, 0)  # returns once the whole pid namespace is gone
      os._exit(0)
    except BaseException as e:
      _report(info_w, {"error": f"namespace setup: {e}"})
      os._exit(70)
  os.close(sync_w)
  os.close(go_r)
  if os.read(sync_r, 1) == b"u":
    try:
      answer = b"1" if _write_maps(pid) else b"0"
    except OSError:
      answer = b"x"
    os.write(go_w, answer)
  os.close(sync_r)
  os.close(go_w)
  return pid


def _kill_children():
  """rlimits mode: S is a subreaper, so the program's orphans are our children; kill them."""
  path = f"/proc/self/task/{os.getpid()}/children"
  for _ in range(100):
    try:
      with open(path) as f:
        kids = [int(x) for x in f.read().split()]
    except OSError:
      return
    if not kids:
      return
    for k in kids:
      try:
        os.kill(k, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for k in kids:
      try:
        os.waitpid(k, 0)
      except ChildProcessError:
        pass


def _verdict(record, info, cfg):
  v = {"status": "error", "completed": record is not None, "exception": None, "traceback": "",
       "cpu_s": info.get("cpu_s"), "maxrss_kb": info.get("maxrss_kb")}
  if info.get("error"):
    v["detail"] = info["error"]
  elif info.get("timed_out"):  # the alarm came before the program was reaped: over the limit,
    v["status"] = "timeout"  # whatever it wrote meanwhile
    v["detail"] = f"wall time limit ({cfg['wall_s']:g} s)"
  elif record is not None:
    v["status"] = record["status"]
    v["exception"] = record.get("exception") or None
    v["traceback"] = record.get("traceback", "")
    if record["status"] == "passed":
      v["detail"] = "the test ran to its end"
    else:
      v["detail"] = f"{record.get('phase')}: {record.get('exception')}"
  else:
    ws = info.get("wstatus", 0)
    if os.WIFSIGNALED(ws):
      sig = os.WTERMSIG(ws)
      cpu_hit = (info.get("cpu_s") or 0) >= cfg["cpu_s"] - 0.05
      if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_hit):
        v["status"], v["detail"] = "timeout", f"CPU time limit ({cfg['cpu_s']:g} s)"
      elif sig == signal.SIGXFSZ:
        v["status"], v["detail"] = "killed", "file size limit"
      else:  # SIGKILL here: the program itself, or an OOM kill the caller recognises
        # from the cgroup's counters and turns into "killed"
        v["status"] = "failed"
        v["detail"] = f"killed by signal {sig} ({signal.strsignal(sig)}) before the test finished"
    else:
      v["status"] = "failed"
      v["detail"] = (f"exited with status {os.WEXITSTATUS(ws)} before the test finished "
                     "(exit codes never count as a pass)")
  return v


def main():
  _linux.prctl(_linux.PR_SET_DUMPABLE, 0)  # same-uid programs cannot read our memory or fds
  cfg = marshal.loads(_read_exact(0, int.from_bytes(_read_exact(0, 4), "big")))  # from the caller
  vfd = cfg["verdict_fd"]
  with open(cfg["program_path"], encoding="utf-8") as f:
    program = f.read()
  with open(cfg["test_path"], encoding="utf-8") as f:
    test = f.read()
  cfg["harness_dir"] = HERE
  done_r, done_w = os.pipe()
  info_r, info_w = os.pipe()
  cfg["done_fd"] = done_w
  if cfg["mode"] == "namespaces":
    child = _spawn_namespaced(cfg, program, test, done_w, info_w, [0, vfd, done_r, info_r])
  else:
    _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
    start_wall_clock(cfg["wall_s"])
    child = os.fork()
    if child == 0:
      program_signals()
      for fd in (vfd, done_r, info_r, info_w):
        os.close(fd)
      _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
      _worker.run(cfg, program, test)
  os.close(done_w)
  os.close(info_w)
  nonce = _read_exact(0, 32).decode("ascii")  # only now: no forked process has it in memory
  os.close(0)
  if cfg["mode"] == "namespaces":
    os.waitpid(child, 0)
    try:
      info = marshal.loads(_read_available(info_r))
    except (EOFError, ValueError, TypeError):
      info = {"error": "sandbox init reported nothing"}
  else:
    info = supervise(child, cfg["wall_s"])
    try:  # a pgid stays reserved while any member lives, so this cannot hit a stranger
      os.killpg(child, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    _kill_children()
  verdict = _verdict(_worker.decode_record(_read_available(done_r)), info, cfg)
  verdict["nonce"] = nonce
  import json  # only now, so the forked sandbox processes never paid for it
  os.write(vfd, json.dumps(verdict).encode())  # json: the caller must parse it safely
  os._exit(0)


if __name__ == "__main__":
  main()
