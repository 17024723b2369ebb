"""One cgroup per sandboxed run: the process cap (pids.max) and a memory cap for the whole run.

Processes here may run as root, for which RLIMIT_NPROC does not bind, so the pids controller is
the primary process cap. Both layouts are handled: cgroup v2 (one unified tree) and v1 (separate
`pids` and `memory` hierarchies, as on hybrid hosts). Groups are created below the caller's own
cgroup in `coder_jax_sandbox/`, so they nest inside whatever limits the caller already has.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time

_GROUP = "coder_jax_sandbox"
_counter = itertools.count()
_lock = threading.Lock()
_layout_cache: list = []


def _unescape(path: str) -> str:
  return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _own_paths() -> dict[str, str]:
  """{controller: our cgroup path}; "" is the v2 entry."""
  out = {}
  for line in _read("/proc/self/cgroup").splitlines():
    _, ctrls, path = line.split(":", 2)
    for c in ctrls.split(",") if ctrls else [""]:
      out[c] = path
  return out


def _mounts():
  for line in _read("/proc/self/mountinfo").splitlines():
    left, _, right = line.partition(" - ")
    lf, rf = left.split(), right.split()
    if rf and rf[0] in ("cgroup", "cgroup2"):
      yield rf[0], _unescape(lf[4]), _unescape(lf[3]), rf[2].split(",") if len(rf) > 2 else []


def _base(mountpoint: str, mount_root: str, own: str) -> str:
  rel = own[len(mount_root):] if own.startswith(mount_root) else own
  return os.path.join(mountpoint, rel.lstrip("/"))


def _find_layout():
  """("v2", {"pids": base, "memory": base}) or ("v1", {...}) or (None, reason)."""
  own = _own_paths()
  v1 = {}
  for fstype, mnt, root, opts in _mounts():
    if fstype == "cgroup2" and "" in own:
      try:
        ctrls = _read(os.path.join(mnt, "cgroup.controllers")).split()
      except OSError:
        continue
      if "pids" in ctrls:
        base = _base(mnt, root, own[""])
        return "v2", {"pids": base, "memory": base if "memory" in ctrls else None}
    elif fstype == "cgroup":
      for c in ("pids", "memory"):
        if c in opts and c in own:
          v1[c] = _base(mnt, root, own[c])
  if "pids" in v1:
    return "v1", {"pids": v1["pids"], "memory": v1.get("memory")}
  return None, "no pids cgroup controller mounted"


class RunCgroup:
  """The cgroup directories of one run (one per v1 hierarchy, one in v2)."""

  def __init__(self, version: str, dirs: list[str], pids_dir: str, mem_dir: str | None):
    self.version, self.dirs, self.pids_dir, self.mem_dir = version, dirs, pids_dir, mem_dir

  def add(self, pid: int) -> None:
    for d in self.dirs:
      _write(os.path.join(d, "cgroup.procs"), str(pid))

  def _counter(self, d: str | None, name: str, key: str) -> int:
    if d is None:
      return 0
    try:
      for line in _read(os.path.join(d, name)).splitlines():
        k, _, v = line.partition(" ")
        if k == key:
          return int(v)
    except (OSError, ValueError):
      pass
    return 0

  def oom_kills(self) -> int:
    name = "memory.events" if self.version == "v2" else "memory.oom_control"
    return self._counter(self.mem_dir, name, "oom_kill")

  def pids_max_hits(self) -> int:
    return self._counter(self.pids_dir, "pids.events", "max")

  def destroy(self) -> None:
    """SIGKILLs everything left in the group, then removes the directories."""
    if self.version == "v2":
      try:
        _write(os.path.join(self.pids_dir, "cgroup.kill"), "1")
      except OSError:
        pass  # kernels before 5.14: the loop below does it
    deadline = time.monotonic() + 5.0
    for d in self.dirs:
      while True:
        try:
          pids = [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
        except OSError:
          break
        if not pids:
          try:
            os.rmdir(d)
          except OSError:
            if time.monotonic() < deadline:  # EBUSY while the last exits finish
              time.sleep(0.002)
              continue
          break
        for p in pids:
          try:
            os.kill(p, signal.SIGKILL)
          except ProcessLookupError:
            pass
        if time.monotonic() > deadline:
          break
        time.sleep(0.001)


def _enable_v2(base: str, parent: str, memory: bool) -> None:
  # Fails with EBUSY where `base` (not the root) has processes of its own: no v2 cap then.
  for d in (base, parent):
    _write(os.path.join(d, "cgroup.subtree_control"), "+pids")
    if memory:
      try:
        _write(os.path.join(d, "cgroup.subtree_control"), "+memory")
      except OSError:
        pass


def _make(version: str, bases: dict, max_tasks: int, memory_bytes: int | None) -> RunCgroup:
  name = f"{os.getpid()}-{next(_counter)}-{os.urandom(3).hex()}"
  want_memory = memory_bytes is not None and bases.get("memory") is not None
  dirs = []

  def new_dir(base):
    parent = os.path.join(base, _GROUP)
    with _lock:
      if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        if version == "v2":  # controllers must be enabled down to our group
          _enable_v2(base, parent, want_memory)
    d = os.path.join(parent, name)
    os.mkdir(d)
    dirs.append(d)
    return d

  try:
    pids_dir = new_dir(bases["pids"])
    _write(os.path.join(pids_dir, "pids.max"), str(max_tasks))
    mem_dir = None
    if want_memory:
      mem_dir = pids_dir if version == "v2" else new_dir(bases["memory"])
      try:
        if version == "v2":
          _write(os.path.join(mem_dir, "memory.max"), str(memory_bytes))
        else:
          _write(os.path.join(mem_dir, "memory.limit_in_bytes"), str(memory_bytes))
      except OSError:
        mem_dir = None  # the process cap matters; the memory cap is a second layer
      for f, v in (("memory.swap.max", "0"), ("memory.memsw.limit_in_bytes", str(memory_bytes))):
        try:  # no swapping past the cap either, where swap accounting exists
          if mem_dir is not None and os.path.exists(os.path.join(mem_dir, f)):
            _write(os.path.join(mem_dir, f), v)
        except OSError:
          pass
  except BaseException:
    RunCgroup(version, dirs, dirs[0] if dirs else "", None).destroy()
    raise
  return RunCgroup(version, dirs, pids_dir, mem_dir)


def _sweep(bases: dict) -> None:
  """Removes empty groups left by callers that died mid-run (rmdir refuses non-empty ones)."""
  for base in {b for b in bases.values() if b}:
    parent = os.path.join(base, _GROUP)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
      pid = name.split("-")[0]
      if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
        try:
          os.rmdir(os.path.join(parent, name))
        except OSError:
          pass


def probe() -> tuple[str | None, bool, str]:
  """(version or None, memory cap available, reason): creates and removes a test group."""
  if _layout_cache:
    return _layout_cache[0]
  try:
    version, bases = _find_layout()
    if version is None:
      result = (None, False, bases)
    else:
      _sweep(bases)
      cg = _make(version, bases, 8, 64 << 20)
      memory = cg.mem_dir is not None
      cg.destroy()
      result = (version, memory, f"cgroup {version} at {bases['pids']}")
  except OSError as e:
    result = (None, False, f"cannot create a cgroup: {e}")
  _layout_cache.append(result)
  return result


def create(max_tasks: int, memory_bytes: int) -> RunCgroup:
  version, bases = _find_layout()
  if version is None:
    raise OSError(bases)
  return _make(version, bases, max_tasks, memory_bytes)
