"""ctypes wrappers for the Linux calls the harness needs (stdlib only).

Python 3.11 has no os.unshare, mount(2), pivot_root(2) or capset(2); the harness needs them to
build the sandbox from inside a fresh interpreter, and the sandbox package must not depend on
anything outside the standard library. Imported only by the harness processes, never by the
caller.
"""

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# pivot_root has no glibc wrapper; an unknown architecture makes the namespace mode unavailable
# (the probe fails and the caller falls back), rather than calling a wrong syscall number.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_libc = ctypes.CDLL(None, use_errno=True)


def _b(s):
  return None if s is None else os.fsencode(s)


def _check(ret, what):
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags):
  _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source, target, fstype, flags=0, data=None):
  _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
         f"mount {target}")


def umount2(target, flags=0):
  _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root, put_old):
  nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
  if nr is None:
    raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
  _check(_libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)), "pivot_root")


def prctl(option, arg2=0):
  _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                     ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")


# statvfs flags -> mount flags: a bind remount must restate the flags the kernel locked on the
# mount (atime mode, nosuid, ...) or it fails with EPERM inside a user namespace.
_KEEP = ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
         (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
         (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


def remount_readonly(path, extra=MS_NOSUID | MS_NODEV):
  have = os.statvfs(path).f_flag
  flags = 0
  for st, ms in _KEEP:
    if have & st:
      flags |= ms
  mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags | extra)


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
  """Empties the bounding, effective, permitted and inheritable sets of this process.

  Needed where the program must run as (namespace) root because no second uid could be mapped:
  without it, root of the user namespace could remount the read-only binds or undo the mounts.
  """
  for cap in range(64):
    try:
      prctl(PR_CAPBSET_DROP, cap)
    except OSError:
      break  # EINVAL past the last capability the kernel knows
  hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
  data = (_CapData * 2)()
  _check(_libc.capset(ctypes.byref(hdr), data), "capset")
