"""Reading code corpora from local directory trees and JSONL dumps, without TensorFlow.

`iter_documents` turns sources into `Document`s and never crashes on a bad
file: every file or record it drops is counted in `BuildStats.skipped` under
one of `SKIP_REASONS`, so a build report accounts for all input. Consumers
call `BuildStats.add` for the documents they keep; `split_of` assigns the
train/validation split from a hash of the document key so that the split is
the same on every machine and in every read order.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import stat
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

from coder_jax.data.cuts import chunk_bounds
from coder_jax.files import write_atomic
from coder_jax.data.languages import language_of, normalize_language

SKIP_REASONS: tuple[str, ...] = (
  "unknown_extension", "empty", "too_large", "binary", "invalid_utf8", "unreadable",
  "symlink_loop", "malformed_jsonl", "duplicate")

# Vendored third-party code and build caches would both skew the language mix
# and duplicate what other sources already hold.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})

_BINARY_PROBE = 8192
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Documents longer than this many characters are cut into parts when a corpus is built, so no later
# stage (FIM, tokenizing, packing) ever holds more of one document: what one file costs there is
# bounded by this, not by --max_file_bytes. 1 Mi characters keeps whole any file under the default
# 1 MiB cap, and a part still fills a 128K-token context.
MAX_DOC_CHARS = 1 << 20


class CorpusError(ValueError):
  """A corpus source cannot be used at all (as opposed to one bad file inside it)."""


@dataclasses.dataclass
class Document:
  key: str  # stable and unique within one build; the split is derived from it
  text: str
  lang: str
  path: str  # path inside the source tree, or the record's own path for JSONL ("" if none)


@dataclasses.dataclass
class BuildStats:
  files_seen: int = 0
  files_read: int = 0
  documents: int = 0
  characters: int = 0
  duplicates: int = 0
  cut_documents: int = 0  # longer than the part size; each of their parts counts as a document
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  per_language: dict[str, dict] = dataclasses.field(default_factory=dict)
  splits: dict[str, int] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str) -> None:
    if reason not in SKIP_REASONS:
      # A typo would otherwise open a new, silently unreported category.
      raise ValueError(f"reason: {reason!r} is not one of {', '.join(SKIP_REASONS)}")
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if reason == "duplicate":
      self.duplicates += 1

  def add(self, doc: Document, split: str) -> None:
    """Counts a document the consumer kept, under its language and split."""
    n = len(doc.text)
    self.documents += 1
    self.characters += n
    lang = self.per_language.setdefault(doc.lang, {"documents": 0, "characters": 0})
    lang["documents"] += 1
    lang["characters"] += n
    self.splits[split] = self.splits.get(split, 0) + 1

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def save(self, path: str) -> None:
    # Readers (a resumed build, tasks.py) never see a half-written file.
    write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

  @classmethod
  def load(cls, path: str) -> BuildStats:
    try:
      with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    except (OSError, ValueError) as e:
      raise CorpusError(f"{path}: cannot read build statistics: {e}") from e
    if not isinstance(data, dict):
      raise CorpusError(f"{path}: build statistics must be a JSON object")
    # Builders add their own keys (per_split_language, sources) next to ours.
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})

  def format(self) -> str:
    rows = [("files seen", self.files_seen), ("files read", self.files_read),
            ("documents", self.documents), ("characters", self.characters),
            ("duplicates", self.duplicates), ("cut into parts", self.cut_documents)]
    rows += [(f"split {s}", n) for s, n in sorted(self.splits.items())]
    lines = ["totals:"] + [f"  {name:<22}{n:>16,}" for name, n in rows]
    lines.append("skipped:")
    skipped = sorted(((n, r) for r, n in self.skipped.items() if n), key=lambda x: (-x[0], x[1]))
    lines += [f"  {r:<22}{n:>16,}" for n, r in skipped] or ["  (none)"]
    lines.append("languages:")
    lines.append(f"  {'language':<20}{'documents':>12}{'characters':>16}{'share':>8}")
    total = max(self.characters, 1)
    by_chars = sorted(self.per_language.items(), key=lambda kv: (-kv[1]["characters"], kv[0]))
    for lang, c in by_chars:
      lines.append(f"  {lang:<20}{c['documents']:>12,}{c['characters']:>16,}"
                   f"{c['characters'] / total:>8.1%}")
    if not by_chars:
      lines.append("  (no documents)")
    return "\n".join(lines)


def split_of(key: str, validation_fraction: float = 0.01) -> str:
  """"train" or "validation" from sha256(key): independent of order, process and machine."""
  if not 0 <= validation_fraction < 1:  # also rejects NaN
    raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction!r}")
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  # 64 hash bits as a uniform number in [0, 1).
  position = int.from_bytes(digest[:8], "big") / 2**64
  return "validation" if position < validation_fraction else "train"


def cut_long(doc: Document, max_chars: int = MAX_DOC_CHARS) -> list[Document]:
  """[doc] when it has at most max_chars characters, else its consecutive parts of at most
  max_chars characters (cut where `cuts` says, so the parts tokenize as the whole), keyed
  "{key}#{i}/{n}" with i from 1. A tree key "a/b.py#1/3" cannot collide with a file's key: a
  file named "3" has no language.
  """
  if max_chars < 2:
    raise ValueError(f"max_doc_chars: must be at least 2, got {max_chars}")
  if len(doc.text) <= max_chars:
    return [doc]
  bounds = list(chunk_bounds(doc.text, max_chars))
  n = len(bounds)
  return [dataclasses.replace(doc, key=f"{doc.key}#{i}/{n}", text=doc.text[a:b])
          for i, (a, b) in enumerate(bounds, start=1)]


def default_sources(include_c_headers: bool = False) -> list[str]:
  """Corpora present on any machine: the Python stdlib, optionally the system C headers."""
  sources = [sysconfig.get_paths()["stdlib"]]
  if include_c_headers and os.path.isdir("/usr/include"):
    sources.append("/usr/include")
  return sources


def _read_bytes(path: str, limit: int) -> bytes:
  # One read past the cap tells a file that grew after stat() from one that fits.
  with open(path, "rb") as fh:
    return fh.read(limit + 1)


def _open_jsonl(path: str):
  return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _is_jsonl(path: str) -> bool:
  return path.lower().endswith(_JSONL_SUFFIXES)


def _source_name(source: str) -> str:
  return os.path.basename(os.path.normpath(os.path.abspath(source))) or "root"


def check_sources(sources: Sequence[str]) -> list[str]:
  """The sources as paths, or CorpusError before any work (missing, none, colliding names)."""
  if isinstance(sources, (str, bytes, os.PathLike)):
    raise CorpusError(f"sources: expected a sequence of paths, got the single path {sources!r}")
  paths = [os.fspath(s) for s in sources]
  if not paths:
    raise CorpusError("sources: no corpus sources given")
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise CorpusError(f"sources: does not exist: {', '.join(missing)}")
  # Keys start with the source's base name; two equal names would give two
  # documents one key, and TFDS rejects duplicate keys only after hours of work.
  seen: dict[str, str] = {}
  for p in paths:
    name = _source_name(p)
    if name in seen:
      raise CorpusError(f"sources: {seen[name]} and {p} share the base name {name!r}, "
                        f"which would make document keys collide")
    seen[name] = p
  return paths


class _Reader:
  """State of one iter_documents call: statistics, size cap and seen-text hashes."""

  def __init__(self, stats: BuildStats, max_file_bytes: int, dedup: bool):
    self.stats = stats
    self.max_bytes = max_file_bytes
    self.hashes: set[bytes] | None = set() if dedup else None

  def accept(self, key: str, text: str, lang: str, path: str) -> Document | None:
    """Shared checks on decoded text; None (and a counted reason) when rejected."""
    if not text.strip():
      self.stats.skip("empty")
      return None
    if self.hashes is not None:
      digest = hashlib.sha256(text.encode("utf-8")).digest()
      if digest in self.hashes:
        self.stats.skip("duplicate")
        return None
      self.hashes.add(digest)
    return Document(key=key, text=text, lang=lang, path=path)

  def decode(self, data: bytes) -> str | None:
    if b"\0" in data[:_BINARY_PROBE]:
      self.stats.skip("binary")
      return None
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      self.stats.skip("invalid_utf8")
      return None
    # A byte-order mark is an editor artifact, not part of the program.
    return text[1:] if text.startswith("\ufeff") else text

  def tree_file(self, full: str, key: str, rel: str, link: bool = False) -> Document | None:
    self.stats.files_seen += 1
    # Dangling and cyclic links are checked before the name: "gone" with no
    # extension is still a broken link, not an unknown language.
    if link and not os.path.exists(full):
      self.stats.skip("symlink_loop")
      return None
    lang = language_of(full)
    if lang is None:
      self.stats.skip("unknown_extension")
      return None
    try:
      st = os.stat(full)
    except OSError:
      # Also a link that broke after the check above.
      self.stats.skip("symlink_loop" if os.path.islink(full) else "unreadable")
      return None
    if not stat.S_ISREG(st.st_mode):
      # Opening a FIFO or a device would block or never end.
      self.stats.skip("unreadable")
      return None
    if st.st_size > self.max_bytes:
      self.stats.skip("too_large")
      return None
    if st.st_size == 0:
      self.stats.skip("empty")
      return None
    try:
      data = _read_bytes(full, self.max_bytes)
    except OSError:
      self.stats.skip("unreadable")
      return None
    self.stats.files_read += 1
    if len(data) > self.max_bytes:
      self.stats.skip("too_large")
      return None
    text = self.decode(data)
    return None if text is None else self.accept(key, text, lang, rel)

  def tree(self, root: str) -> Iterator[Document]:
    """Depth-first, name-sorted walk; files of a directory come before its subdirectories."""
    name = _source_name(root)
    try:
      top = os.stat(root)
    except OSError:
      self.stats.skip("unreadable")
      return
    # Identity by (device, inode) rather than real path also catches bind-mount loops.
    visited = {(top.st_dev, top.st_ino)}
    stack = [(root, "")]
    while stack:
      path, rel = stack.pop()
      try:
        with os.scandir(path) as it:
          entries = sorted(it, key=lambda e: e.name)
      except OSError:
        self.stats.skip("unreadable")
        continue
      files, real_dirs, linked_dirs = [], [], []
      for e in entries:
        sub = f"{rel}/{e.name}" if rel else e.name
        try:
          is_dir = e.is_dir()  # follows links; broken links are files here
        except OSError:
          is_dir = False
        if not is_dir:
          files.append((e.path, sub, e.is_symlink()))
        elif e.name not in EXCLUDED_DIRS:
          (linked_dirs if e.is_symlink() else real_dirs).append((e.path, sub))
      for full, sub, link in files:
        doc = self.tree_file(full, f"{name}/{sub}", sub, link)
        if doc is not None:
          yield doc
      subdirs = []
      # Real directories claim their identity first so that a link to a sibling
      # is the one dropped, not the sibling itself.
      for full, sub in real_dirs + linked_dirs:
        try:
          st = os.stat(full)
        except OSError:
          self.stats.skip("unreadable")
          continue
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
          self.stats.skip("symlink_loop")
          continue
        visited.add(ident)
        subdirs.append((full, sub))
      subdirs.sort(key=lambda t: t[1])
      stack.extend(reversed(subdirs))

  def single_file(self, path: str) -> Iterator[Document]:
    name = _source_name(path)
    doc = self.tree_file(path, name, name)
    if doc is not None:
      yield doc

  def jsonl(self, path: str) -> Iterator[Document]:
    name = _source_name(path)
    self.stats.files_seen += 1
    try:
      fh = _open_jsonl(path)
    except OSError:
      self.stats.skip("unreadable")
      return
    with fh:
      self.stats.files_read += 1
      lineno = 0
      while True:
        try:
          line = fh.readline()
        except (OSError, EOFError, ValueError, zlib.error):
          # A truncated or corrupt .gz: keep what was read, count the rest once.
          self.stats.skip("unreadable")
          return
        if not line:
          return
        lineno += 1
        if not line.strip():
          continue
        doc = self.record(line, f"{name}:{lineno}")
        if doc is not None:
          yield doc

  def record(self, line: bytes, key: str) -> Document | None:
    try:
      rec = json.loads(line)
    except UnicodeDecodeError:
      self.stats.skip("invalid_utf8")
      return None
    except (ValueError, RecursionError):
      self.stats.skip("malformed_jsonl")
      return None
    text = None
    if isinstance(rec, dict):
      text = next((rec[f] for f in ("content", "text") if isinstance(rec.get(f), str)), None)
    if text is None:
      self.stats.skip("malformed_jsonl")
      return None
    try:
      size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
      # JSON can spell lone surrogates ("\ud800") that no UTF-8 file can hold.
      self.stats.skip("invalid_utf8")
      return None
    if size > self.max_bytes:
      self.stats.skip("too_large")
      return None
    if "\0" in text[:_BINARY_PROBE]:
      self.stats.skip("binary")
      return None
    path = next((rec[f] for f in ("path", "max_stars_repo_path")
                 if isinstance(rec.get(f), str)), "")
    label = next((rec[f] for f in ("lang", "language")
                  if isinstance(rec.get(f), str) and rec[f].strip()), None)
    if label is not None:
      lang = normalize_language(label)
    else:
      lang = (language_of(path) if path else None) or "unknown"
    return self.accept(key, text, lang, path)


def iter_documents(sources: Sequence[str], stats: BuildStats, *, max_file_bytes: int = 1 << 20,
                   dedup: bool = True) -> Iterator[Document]:
  """Documents from directory trees, single files and explicit .jsonl/.jsonl.gz files.

  All sources are checked (CorpusError) when this is called, before anything
  is read. Tree documents are keyed "{source base name}/{relative path}",
  JSONL records "{file name}:{line number}". Files and records that cannot be
  used are counted in stats.skipped; documents themselves are counted only
  when the consumer calls stats.add, so stats reflect what was kept.
  """
  paths = check_sources(sources)
  if max_file_bytes <= 0:
    raise ValueError(f"max_file_bytes: must be positive, got {max_file_bytes}")
  return _iter(paths, _Reader(stats, max_file_bytes, dedup))


def _iter(paths: list[str], reader: _Reader) -> Iterator[Document]:
  for path in paths:
    if os.path.isdir(path):
      yield from reader.tree(path)
    elif _is_jsonl(path):
      yield from reader.jsonl(path)
    else:
      yield from reader.single_file(path)
