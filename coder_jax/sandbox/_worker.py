"""The worker: the one process that runs the model's program, then the test, in one namespace.

Runs inside the sandbox (forked by the harness, see _harness.py). It first finishes the
confinement that must happen in the process itself (stdin, fds, uid, capabilities, rlimits,
environment), then executes the program and the test from memory: both were read by the
supervisor before any untrusted code ran, so deleting or rewriting solution.py /
test_solution.py on disk cannot change what is tested (the files are there for code that reads
its own source, e.g. inspect).

The worker's only way to report success is one completion record written to `done_fd` after the
test body returned. The supervisor turns that record (or its absence) into the verdict; exit
codes are never read as success.
"""

import builtins
import math
import os
import resource
import sys

import _linux

RECORD_TAG = b"CJXSBX1 "
RECORD_FIELDS = ("status", "phase", "exception", "traceback")
_MAX_EXC = 2000
_MAX_TB = 8000

# Bound once at import: the program may rebind builtins or os.* before the harness code that
# uses them runs again; these names are module globals the program does not touch by accident.
_BaseException = BaseException
_MemoryError = MemoryError
_isinstance = isinstance
_exec = exec
_compile = compile
_write = os.write
_exit = os._exit


def _summary(exc):
  try:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
  except _BaseException:  # a program-defined __str__ may itself raise
    text = type(exc).__name__
  return text[:_MAX_EXC]


def _traceback(exc, sources):
  """The traceback of `exc`, source lines from memory: the traceback module pulls in linecache,
  tokenize and re, ~11 ms of imports on every check."""
  try:
    out = ["Traceback (most recent call last):\n"]
    tb = exc.__traceback__
    while tb is not None:
      code = tb.tb_frame.f_code
      if code.co_filename != __file__:  # the harness's own frame says nothing useful
        out.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n')
        src = sources.get(code.co_filename)
        line = src.splitlines()[tb.tb_lineno - 1:tb.tb_lineno] if src and tb.tb_lineno else []
        if line:
          out.append(f"    {line[0].strip()}\n")
      tb = tb.tb_next
    out.append(_summary(exc) + "\n")
    return "".join(out)[-_MAX_TB:]
  except _BaseException:
    return ""


def encode_record(rec):
  # Length-prefixed fields rather than json: json (and re, enum) would cost every check ~8 ms
  # of imports in this interpreter; the supervisor parses this strictly (decode_record).
  out = [RECORD_TAG]
  for name in RECORD_FIELDS:
    data = (rec.get(name) or "").encode("utf-8", "replace")
    out += [len(data).to_bytes(4, "big"), data]
  return b"".join(out)


def decode_record(raw):
  """The record, or None unless `raw` is exactly one well-formed record."""
  if not raw.startswith(RECORD_TAG):
    return None
  rec, pos = {}, len(RECORD_TAG)
  for name in RECORD_FIELDS:
    n = int.from_bytes(raw[pos:pos + 4], "big")
    if pos + 4 + n > len(raw):
      return None
    rec[name] = raw[pos + 4:pos + 4 + n].decode("utf-8", "replace")
    pos += 4 + n
  if pos != len(raw) or rec["status"] not in ("passed", "failed", "killed", "error"):
    return None  # trailing or missing bytes: the program wrote into the channel too
  return rec


def _setrlimit(res, soft, hard=None):
  hard = soft if hard is None else hard
  cur_hard = resource.getrlimit(res)[1]
  if cur_hard != resource.RLIM_INFINITY:  # may lower, never raise, an existing hard limit
    soft, hard = min(soft, cur_hard), min(hard, cur_hard)
  resource.setrlimit(res, (soft, hard))


def _confine(cfg, program, test):
  lim = cfg["limits"]
  # The config pipe may still hold the nonce: the program gets /dev/null instead.
  null = os.open(os.devnull, os.O_RDWR)
  if null != 0:  # in the namespaces mode fd 0 was already closed and null *is* 0
    os.dup2(null, 0)
    os.close(null)
  os.set_inheritable(0, True)
  done_fd = cfg["done_fd"]
  os.closerange(3, done_fd)
  os.closerange(done_fd + 1, 1 << 20)
  if cfg["mode"] == "rlimits":
    os.setpgid(0, 0)  # one group the supervisor kills at once, without killing itself
  uid = cfg["drop_uid"]
  if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # from root: also clears every capability
  _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot give root back
  if os.geteuid() == 0:
    _linux.drop_capabilities()  # still (namespace) root: no second uid could be mapped
  os.nice(cfg["nice"])
  os.chdir(cfg["workdir"])
  if cfg["mode"] == "namespaces":  # a fresh tmpfs: the files live on the host side only
    for path, text in ((cfg["program_path"], program), (cfg["test_path"], test)):
      with open(path, "w", encoding="utf-8") as f:
        f.write(text)
  _setrlimit(resource.RLIMIT_CORE, 0)
  cpu = max(1, math.ceil(cfg["cpu_s"]))
  _setrlimit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU first, SIGKILL a second later
  _setrlimit(resource.RLIMIT_AS, lim["address_space_bytes"])
  _setrlimit(resource.RLIMIT_FSIZE, lim["file_size_bytes"])
  _setrlimit(resource.RLIMIT_NOFILE, lim["open_files"])
  if cfg["nproc"] is not None:
    _setrlimit(resource.RLIMIT_NPROC, cfg["nproc"])
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cfg["workdir"], "TMPDIR": "/tmp",
         "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
  if cfg.get("tag"):
    env["CODER_JAX_SANDBOX_TAG"] = cfg["tag"]  # lets tests find exec'd leftovers by environ
  os.environ.clear()
  os.environ.update(env)
  sys.path[:] = [cfg["workdir"]] + [p for p in sys.path if p != cfg["harness_dir"]]
  sys.argv[:] = [cfg["program_path"]]
  sys.stdout.reconfigure(line_buffering=True)  # output up to a kill is kept, not lost in buffers


def run(cfg, program, test):
  """Never returns: exits through finish() with a completion record, or dies trying."""
  done_fd = cfg["done_fd"]
  out, err = sys.stdout, sys.stderr
  sources = {cfg["program_path"]: program, cfg["test_path"]: test}

  def finish(status, phase, exc=None):
    rec = {"status": status, "phase": phase}
    if exc is not None:
      rec["exception"] = _summary(exc)
      rec["traceback"] = _traceback(exc, sources)
    for stream in (sys.stdout, sys.stderr, out, err):
      try:
        stream.flush()
      except _BaseException:
        pass
    try:
      _write(done_fd, encode_record(rec))
    finally:
      _exit(0)  # skip atexit handlers and thread joins the program may have left behind

  try:
    _confine(cfg, program, test)
  except _BaseException as e:
    finish("error", "sandbox setup", e)
  # A snapshot of the builtins, restored between program and test, so a program that rebinds
  # sorted/len/print/... to fake the test's expectations is tested against the real ones.
  pristine = dict(builtins.__dict__)
  try:
    prog_code = _compile(program, cfg["program_path"], "exec")
  except _BaseException as e:
    finish("failed", "program compile", e)
  try:
    test_code = _compile(test, cfg["test_path"], "exec")
  except _BaseException as e:
    finish("error", "test compile", e)  # the caller's test is broken, not the program
  # Not "__main__": like the common code-eval harnesses, demo blocks under
  # `if __name__ == "__main__":` (often reading stdin) do not run.
  g = {"__name__": "solution", "__file__": cfg["program_path"], "__builtins__": builtins}
  try:
    _exec(prog_code, g)
  except _BaseException as e:
    finish("killed" if _isinstance(e, _MemoryError) else "failed", "program", e)
  try:
    sys.settrace(None)
    sys.setprofile(None)
    builtins.__dict__.clear()
    builtins.__dict__.update(pristine)
    sys.stdout, sys.stderr = out, err
  except _BaseException as e:
    finish("failed", "restoring builtins", e)
  try:
    _exec(test_code, g)
  except _BaseException as e:  # SystemExit / KeyboardInterrupt in the test are failures too
    finish("killed" if _isinstance(e, _MemoryError) else "failed", "test", e)
  finish("passed", "test")
