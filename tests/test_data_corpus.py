"""Corpus reading: every skip reason counted exactly, stable keys, hash splits, real stdlib walk."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os

import pytest

from coder_jax.data import corpus
from coder_jax.data.corpus import (SKIP_REASONS, BuildStats, CorpusError, default_sources,
                                   iter_documents, split_of)
from coder_jax.data.languages import EXTENSIONS, LANGUAGES, language_of, normalize_language

CAP = 256
MAIN = "print('hi')\n"


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    path.write_text(data, encoding="utf-8")
  else:
    path.write_bytes(data)


def _build_corpus(root):
  """A tree with good files and one of each bad kind, plus JSONL sources and a single file."""
  repo = root / "repo"
  _write(repo / "main.py", MAIN)
  _write(repo / "zz_copy.py", MAIN)  # sorts after main.py, so it is the duplicate
  _write(repo / "bom.py", "\ufeffx = 1\n")
  _write(repo / "Makefile", "all:\n\techo ok\n")
  _write(repo / "lib" / "util.c", "int f(void) { return 1; }\n")
  _write(repo / "lib" / "util.h", "int f(void);\n")
  _write(repo / "web" / "app.ts", "export const a: number = 1;\n")
  _write(repo / "notes.xyz", "no language\n")
  _write(repo / "data.jsonl", '{"content": "inside a tree this is not JSONL"}\n')
  _write(repo / "empty.py", b"")
  _write(repo / "blank.rs", "   \n\t\n")
  _write(repo / "big.go", "// " + "x" * CAP + "\n")
  _write(repo / "blob.py", b"abc\x00def")
  _write(repo / "latin.py", b"\xff\xfe\xfa")
  _write(repo / "secret.py", "password = 1\n")
  os.symlink("..", repo / "lib" / "loop")
  os.symlink(repo / "does_not_exist", repo / "gone")
  # Never walked: caches, vendored packages, VCS metadata.
  for d in ("__pycache__", "site-packages", ".git"):
    _write(repo / d / "hidden.py", f"# {d}\n")

  lines = [
      json.dumps({"content": "fn main() {}\n", "lang": "Rust", "path": "src/main.rs"}),
      "{oops",
      "[1, 2]",
      json.dumps({"path": "a.py"}),
      "",
      json.dumps({"text": "SELECT 1;\n", "max_stars_repo_path": "q/x.sql"}),
      json.dumps({"content": "just words"}),
      json.dumps({"content": "class A {}", "lang": "C#"}),
      json.dumps({"content": MAIN}),
      json.dumps({"content": "  "}),
  ]
  _write(root / "dump.jsonl", "\n".join(lines) + "\n")
  gz = [json.dumps({"content": "x" * (CAP + 1)}),
        json.dumps({"content": "module M; end\n", "path": "m.rb"})]
  (root / "more.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz) + "\n").encode()))
  _write(root / "solo.lua", "print(1)\n")
  return [str(repo), str(root / "dump.jsonl"), str(root / "more.jsonl.gz"),
          str(root / "solo.lua")]


@pytest.fixture
def deny_secret(monkeypatch):
  # Tests run as root, where chmod 000 does not stop reads; fail the read itself.
  real = corpus._read_bytes

  def read(path, limit):
    if path.endswith("secret.py"):
      raise PermissionError(13, "Permission denied", path)
    return real(path, limit)

  monkeypatch.setattr(corpus, "_read_bytes", read)


def test_every_reason_counted_and_documents_exact(tmp_path, deny_secret):
  sources = _build_corpus(tmp_path)
  stats = BuildStats()
  docs = list(iter_documents(sources, stats, max_file_bytes=CAP))
  for d in docs:
    stats.add(d, split_of(d.key))

  assert [d.key for d in docs] == [
      "repo/Makefile", "repo/bom.py", "repo/main.py", "repo/lib/util.c", "repo/lib/util.h",
      "repo/web/app.ts", "dump.jsonl:1", "dump.jsonl:6", "dump.jsonl:7", "dump.jsonl:8",
      "more.jsonl.gz:2", "solo.lua"]
  assert [d.lang for d in docs] == [
      "makefile", "python", "python", "c", "c", "typescript", "rust", "sql", "unknown",
      "c-sharp", "ruby", "lua"]
  by_key = {d.key: d for d in docs}
  assert by_key["repo/bom.py"].text == "x = 1\n"
  assert by_key["repo/lib/util.c"].path == "lib/util.c"
  assert by_key["dump.jsonl:1"].path == "src/main.rs"
  assert by_key["dump.jsonl:6"].path == "q/x.sql"
  assert by_key["dump.jsonl:7"].path == ""
  assert by_key["solo.lua"].text == "print(1)\n"

  assert stats.skipped == {
      "unknown_extension": 2, "empty": 3, "too_large": 2, "binary": 1, "invalid_utf8": 1,
      "unreadable": 1, "symlink_loop": 2, "malformed_jsonl": 3, "duplicate": 2}
  assert set(stats.skipped) == set(SKIP_REASONS)
  assert stats.duplicates == 2
  # 16 tree files (links included, excluded directories not), 2 JSONL files, 1 single file.
  assert stats.files_seen == 19
  # Read: every tree file that passed the name/size checks, except the denied one.
  assert stats.files_read == 13
  assert stats.documents == len(docs) == 12
  assert stats.characters == sum(len(d.text) for d in docs)
  assert stats.per_language["python"] == {"documents": 2, "characters": len("x = 1\n") + len(MAIN)}
  assert stats.per_language["c"]["documents"] == 2
  assert sum(stats.splits.values()) == 12

  text = stats.format()
  for reason in SKIP_REASONS:
    assert reason in text
  assert "typescript" in text and "files seen" in text
  # Languages are listed by characters, largest first.
  order = [line.split()[0] for line in text.splitlines()
           if line.split() and line.split()[0] in stats.per_language]
  chars = [stats.per_language[lang]["characters"] for lang in order]
  assert chars == sorted(chars, reverse=True) and len(order) == len(stats.per_language)

  path = tmp_path / "out" / "stats.json"
  stats.save(str(path))
  assert BuildStats.load(str(path)) == stats
  assert json.loads(path.read_text())["skipped"]["symlink_loop"] == 2


def test_dedup_off_keeps_duplicates(tmp_path, deny_secret):
  stats = BuildStats()
  keys = [d.key for d in iter_documents(_build_corpus(tmp_path), stats, max_file_bytes=CAP,
                                        dedup=False)]
  assert "repo/zz_copy.py" in keys and "dump.jsonl:9" in keys
  assert "duplicate" not in stats.skipped and stats.duplicates == 0


def test_link_cycles_terminate(tmp_path):
  root = tmp_path / "cyc"
  _write(root / "a" / "x.py", "a = 1\n")
  _write(root / "b" / "y.py", "b = 2\n")
  os.symlink("../b", root / "a" / "to_b")  # b is walked anyway: the link is dropped
  os.symlink("../a", root / "b" / "to_a")
  os.symlink("self_loop", root / "self_loop")
  os.symlink("two.py", root / "one.py")
  os.symlink("one.py", root / "two.py")
  stats = BuildStats()
  docs = list(iter_documents([str(root)], stats))
  assert [d.key for d in docs] == ["cyc/a/x.py", "cyc/b/y.py"]
  assert stats.skipped == {"symlink_loop": 5}


def test_corrupt_gzip_counted_as_unreadable(tmp_path):
  bad = tmp_path / "bad.jsonl.gz"
  bad.write_bytes(b"this is not gzip")
  stats = BuildStats()
  assert list(iter_documents([str(bad)], stats)) == []
  assert stats.skipped == {"unreadable": 1}


def test_truncated_gzip_keeps_earlier_records(tmp_path):
  records = [json.dumps({"content": f"line_{i} = {i}\n", "lang": "python"}) for i in range(2000)]
  blob = gzip.compress(("\n".join(records) + "\n").encode())
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(blob[: len(blob) // 2])
  stats = BuildStats()
  docs = list(iter_documents([str(path)], stats))
  assert 0 < len(docs) < 2000 and docs[0].key == "cut.jsonl.gz:1"
  assert stats.skipped == {"unreadable": 1}


def test_missing_source_raises_before_reading(tmp_path):
  good = tmp_path / "ok"
  _write(good / "a.py", "a = 1\n")
  missing = str(tmp_path / "nope")
  stats = BuildStats()
  with pytest.raises(CorpusError, match="nope"):
    iter_documents([str(good), missing], stats)  # raised by the call, not on first next()
  assert stats == BuildStats()


def test_bad_arguments(tmp_path):
  for d in ("x/src", "y/src"):
    _write(tmp_path / d / "a.py", f"# {d}\n")
  with pytest.raises(CorpusError, match="base name"):
    iter_documents([str(tmp_path / "x" / "src"), str(tmp_path / "y" / "src")], BuildStats())
  with pytest.raises(CorpusError, match="single path"):
    iter_documents(str(tmp_path), BuildStats())
  with pytest.raises(CorpusError):
    iter_documents([], BuildStats())
  with pytest.raises(ValueError, match="max_file_bytes"):
    iter_documents([str(tmp_path / "x" / "src")], BuildStats(), max_file_bytes=0)
  with pytest.raises(ValueError, match="reason"):
    BuildStats().skip("bogus")
  (tmp_path / "junk.json").write_text("[1")
  with pytest.raises(CorpusError, match="junk.json"):
    BuildStats.load(str(tmp_path / "junk.json"))


def test_split_of_deterministic_and_proportional():
  keys = [f"repo/file_{i}.py" for i in range(20000)]
  first = [split_of(k, 0.1) for k in keys]
  assert first == [split_of(k, 0.1) for k in keys]
  assert 0.09 <= first.count("validation") / len(keys) <= 0.11
  assert set(first) == {"train", "validation"}
  assert {split_of(k, 0.0) for k in keys[:500]} == {"train"}
  # Known value pins the hash scheme: changing it silently reshuffles every split.
  assert [k for k in (f"k{i}" for i in range(100)) if split_of(k) == "validation"] == ["k2", "k79",
                                                                                     "k84"]
  for bad in (1.0, -0.1, math.nan, 2):
    with pytest.raises(ValueError, match="validation_fraction"):
      split_of("k", bad)


def test_languages_table():
  assert len(LANGUAGES) >= 45
  assert list(LANGUAGES) == sorted(set(LANGUAGES))
  for lang in LANGUAGES:
    assert any(v == lang for v in EXTENSIONS.values()), lang
  for name in EXTENSIONS:
    assert name == name.lower() or not name.startswith("."), name
  for lang in ("python", "c", "cpp", "java", "javascript", "typescript", "go", "rust", "ruby",
               "php", "c-sharp", "kotlin", "scala", "swift", "shell", "perl", "lua", "r",
               "julia", "haskell", "ocaml", "elixir", "erlang", "clojure", "lisp", "scheme",
               "fortran", "pascal", "ada", "d", "dart", "groovy", "sql", "html", "css",
               "markdown", "rst", "yaml", "toml", "json", "xml", "makefile", "dockerfile",
               "cmake", "assembly", "verilog", "vhdl", "matlab", "powershell", "batch", "tex",
               "protobuf", "zig", "nim"):
    assert lang in LANGUAGES, lang
  cases = {"a/b.PY": "python", "x.h": "c", "x.hpp": "cpp", "src/Makefile": "makefile",
           "Dockerfile": "dockerfile", "CMakeLists.txt": "cmake", "k.kt": "kotlin",
           "notes.txt": None, "README": None, "x.unknownext": None, ".bashrc": None}
  for path, lang in cases.items():
    assert language_of(path) == lang, path
  assert normalize_language(" C++ ") == "cpp"
  assert normalize_language("Python") == "python"
  assert normalize_language("Jupyter Notebook") == "jupyter-notebook"


def test_default_sources_walk_stdlib():
  sources = default_sources()
  assert len(sources) == 1 and os.path.isdir(sources[0])
  if os.path.isdir("/usr/include"):
    assert default_sources(include_c_headers=True) == sources + ["/usr/include"]
  stats = BuildStats()
  docs = list(itertools.islice(iter_documents(sources, stats), 600))
  assert len(docs) == 600
  assert sum(d.lang == "python" for d in docs) >= 500
  assert not any("site-packages" in d.key or "__pycache__" in d.key for d in docs)
  assert len({d.key for d in docs}) == 600
