"""File-name to programming-language mapping for the code corpus.

Language names are short, lowercase and stable: they end up in TFRecords, in
per-language statistics and in mixture weights, so renaming one is a data
format change. Ambiguous extensions are resolved toward the language that is
far more common in open-source code (".m" is MATLAB, ".pl" is Perl, ".v" is
Verilog, ".h" is C).
"""

from __future__ import annotations

import os

# Exact file names win over extensions; they are matched case-sensitively
# because build tools themselves are case-sensitive about them.
_FILE_NAMES: dict[str, str] = {
  "Makefile": "makefile",
  "makefile": "makefile",
  "GNUmakefile": "makefile",
  "Dockerfile": "dockerfile",
  "Containerfile": "dockerfile",
  "CMakeLists.txt": "cmake",
  "Rakefile": "ruby",
  "Gemfile": "ruby",
  "Jenkinsfile": "groovy",
  "BUILD": "starlark",
  "BUILD.bazel": "starlark",
  "WORKSPACE": "starlark",
}

# Language -> extensions, written this way round so that each language's
# coverage reads in one place; inverted into EXTENSIONS below.
_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
  "python": (".py", ".pyi", ".pyw"),
  "cython": (".pyx", ".pxd"),
  "c": (".c", ".h"),
  "cpp": (".cc", ".cpp", ".cxx", ".c++", ".hh", ".hpp", ".hxx", ".h++", ".inl", ".ipp", ".tcc"),
  "cuda": (".cu", ".cuh"),
  "objective-c": (".mm",),
  "java": (".java",),
  "javascript": (".js", ".mjs", ".cjs", ".jsx"),
  "typescript": (".ts", ".mts", ".cts", ".tsx"),
  "coffeescript": (".coffee",),
  "go": (".go",),
  "rust": (".rs",),
  "ruby": (".rb", ".rake", ".gemspec"),
  "php": (".php", ".phtml"),
  "c-sharp": (".cs", ".csx"),
  "fsharp": (".fs", ".fsi", ".fsx"),
  "visual-basic": (".vb", ".vbs", ".bas"),
  "kotlin": (".kt", ".kts"),
  "scala": (".scala", ".sc"),
  "swift": (".swift",),
  "shell": (".sh", ".bash", ".zsh", ".ksh"),
  "fish": (".fish",),
  "powershell": (".ps1", ".psm1", ".psd1"),
  "batch": (".bat", ".cmd"),
  "perl": (".pl", ".pm", ".t", ".pod"),
  "lua": (".lua",),
  "r": (".r", ".rmd"),
  "julia": (".jl",),
  "haskell": (".hs", ".lhs"),
  "ocaml": (".ml", ".mli"),
  "elm": (".elm",),
  "elixir": (".ex", ".exs"),
  "erlang": (".erl", ".hrl"),
  "clojure": (".clj", ".cljs", ".cljc", ".edn"),
  "lisp": (".lisp", ".lsp", ".cl"),
  "emacs-lisp": (".el",),
  "scheme": (".scm", ".ss"),
  "racket": (".rkt",),
  "fortran": (".f", ".for", ".f77", ".f90", ".f95", ".f03", ".f08"),
  "pascal": (".pas", ".dpr"),
  "ada": (".adb", ".ads"),
  "d": (".d",),
  "dart": (".dart",),
  "groovy": (".groovy", ".gradle"),
  "tcl": (".tcl",),
  "awk": (".awk",),
  "vim": (".vim",),
  "sql": (".sql",),
  "graphql": (".graphql", ".gql"),
  "html": (".html", ".htm", ".xhtml"),
  "css": (".css",),
  "scss": (".scss", ".sass", ".less"),
  "vue": (".vue",),
  "svelte": (".svelte",),
  "markdown": (".md", ".markdown"),
  "rst": (".rst",),
  "tex": (".tex", ".sty", ".cls"),
  "yaml": (".yaml", ".yml"),
  "toml": (".toml",),
  "json": (".json",),
  "ini": (".ini", ".cfg"),
  "xml": (".xml", ".xsd", ".xsl", ".xslt"),
  "makefile": (".mk", ".mak"),
  "dockerfile": (".dockerfile",),
  "cmake": (".cmake",),
  "starlark": (".bzl", ".star"),
  "hcl": (".tf", ".hcl"),
  "assembly": (".s", ".asm"),
  "verilog": (".v", ".sv", ".svh", ".vh"),
  "vhdl": (".vhd", ".vhdl"),
  "matlab": (".m",),
  "protobuf": (".proto",),
  "thrift": (".thrift",),
  "solidity": (".sol",),
  "zig": (".zig",),
  "nim": (".nim", ".nims"),
  "crystal": (".cr",),
  "cobol": (".cob", ".cbl"),
  "smalltalk": (".st",),
  "glsl": (".glsl", ".vert", ".frag"),
}


def _invert() -> dict[str, str]:
  table: dict[str, str] = dict(_FILE_NAMES)
  for lang, exts in _BY_LANGUAGE.items():
    for ext in exts:
      # A silent overwrite here would quietly relabel a whole language.
      assert ext not in table, f"extension {ext} mapped twice"
      assert ext == ext.lower() and ext.startswith("."), ext
      table[ext] = lang
  return table


EXTENSIONS: dict[str, str] = _invert()
LANGUAGES: tuple[str, ...] = tuple(sorted(set(EXTENSIONS.values())))

# Spellings used by public datasets (The Stack's "lang", GitHub linguist
# names) for languages that have a different name here.
_ALIASES: dict[str, str] = {
  "c++": "cpp",
  "cplusplus": "cpp",
  "c#": "c-sharp",
  "csharp": "c-sharp",
  "f#": "fsharp",
  "f-sharp": "fsharp",
  "objective-c++": "objective-c",
  "objc": "objective-c",
  "js": "javascript",
  "ts": "typescript",
  "golang": "go",
  "bash": "shell",
  "sh": "shell",
  "zsh": "shell",
  "batchfile": "batch",
  "latex": "tex",
  "restructuredtext": "rst",
  "common-lisp": "lisp",
  "emacs lisp": "emacs-lisp",
  "visual basic": "visual-basic",
  "vba": "visual-basic",
  "protocol buffer": "protobuf",
  "protocol-buffer": "protobuf",
  "yml": "yaml",
  "py": "python",
  "rs": "rust",
}


def language_of(path: str) -> str | None:
  """Language of a file from its name, or None when the name is not code we know."""
  name = os.path.basename(os.fspath(path))
  if name in _FILE_NAMES:
    return _FILE_NAMES[name]
  if name.startswith("Dockerfile."):
    return "dockerfile"
  ext = os.path.splitext(name)[1].lower()
  return EXTENSIONS.get(ext) if ext else None


def normalize_language(name: str) -> str:
  """Canonical language name for a dataset's own label ("C++" -> "cpp").

  Labels this module does not know are kept (lowercased, spaces as dashes) so
  that a new language in a dataset shows up in statistics instead of vanishing.
  """
  key = " ".join(name.strip().lower().split())
  if key in _ALIASES:
    return _ALIASES[key]
  return _ALIASES.get(key.replace(" ", "-"), key.replace(" ", "-"))
