"""A stack: the on-disk state of a continually trained model.

    STACK/manifest.json              the commit point: base model, method, settings, domains,
                                     and every file below with its size and sha256
    STACK/adapters/<domain>/         PEFT adapters, loadable by plain `peft` (methods with one
                                     shared adapter: adapters/<method>/ or adapters/subspace/)
    STACK/crma_backbone.safetensors  the shared CRMA backbone (+ crma_config.json)
    STACK/router.safetensors         the stored centroid router
    STACK/method_state.safetensors   method state across domains (Fisher, buffers), if any
    STACK/checkpoint/                an unfinished domain's training state (resume)
    STACK/metrics.jsonl              per-step training metrics of `crma train`
    STACK/writer.lock                held by the one process writing (crma.lock)

A directory becomes a stack when its first domain commits. A commit writes every file it
changes under a name the committed manifest does not use — the usual name, or, while the
committed manifest still lists that, the name with the new generation number added
(`crma_backbone.3.safetensors`, `adapters/alpha.3/`) — then renames the new manifest into
place, the commit point, and only then deletes files no manifest lists. Committed files are
never modified, so a reader that reads the manifest once and then the files it lists sees one
committed state; if a commit deletes a file while a reader loads, the reader starts again
from the new manifest (crma.continual). Format-1 stacks (crma before this layout) open as
they are and are upgraded by their next commit.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from crma.errors import UserError
from crma.fileio import atomic_path, file_sha256, is_temporary, write_json
from crma.lock import LOCK_FILE

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
STREAM_LOG = "stream.jsonl"  # crma stream's decisions (crma.stream.learner)
ADAPTERS = "adapters"
BACKBONE_FILE = "crma_backbone.safetensors"
BACKBONE_CONFIG = "crma_config.json"
ROUTER_FILE = "router.safetensors"
METHOD_STATE = "method_state.safetensors"
DAMAGED = "the stack is damaged: restore it from a copy (`crma check STACK` checks every file)"
# Opening a stack hashes its files when they add up to at most this; `crma check` always does.
HASH_AT_OPEN = 512 << 20

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': versioned folders use it
# `crma generate --domain auto` routes; `base` is the model without adapter.
RESERVED = ("auto", "base")
# Committed files at the top level, in any generation: what a commit may delete once unlisted.
_COMMITTED = re.compile(
    r"^(crma_backbone|crma_config|router|method_state)(\.\d+)?\.(safetensors|json)$"
)


def name_problem(name: str, reserved: tuple[str, ...] = RESERVED) -> str | None:
    """What a domain (or run label) name allows, or None when `name` is one."""
    if isinstance(name, str) and _NAME.match(name) and name not in reserved:
        return None
    rule = "a name of letters, digits, '_' and '-' (up to 64, starting with a letter or digit)"
    return f"{rule}, not {' or '.join(reserved)}" if reserved else rule


def check_domain_name(name: str) -> str:
    if problem := name_problem(name):
        raise UserError(f"domain name {name!r}: expected {problem}")
    return name


class Stack:
    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # -- creation and opening ----------------------------------------------------------
    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def new(
        cls, path: str | Path, base: dict[str, str], method: str, configs: dict[str, Any]
    ) -> Stack:
        """A stack not written yet: its directory becomes a stack when the first domain commits.

        The directory may hold what an earlier, failed first call left (a checkpoint, the lock
        file, uncommitted files), nothing else.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory")
        stray = (
            sorted(p.name for p in path.iterdir() if not _stack_owned(p.name))
            if path.is_dir()
            else []
        )
        if stray:
            raise UserError(
                f"{path}: exists and is not a crma stack (it holds {stray[0]!r}); "
                "choose an empty or new directory"
            )
        manifest = {
            "format": FORMAT_VERSION,
            "generation": 0,
            "base_model": base,
            "method": method,
            "configs": configs,
            "domains": [],
            "adapters": {},
            "files": {},
            "created": _now(),
        }
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path) -> Stack:
        """The committed stack at `path`, its files checked (sizes; hashes if small)."""
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise UserError(f"{path}: not a crma stack (no {MANIFEST})")
        try:
            manifest = json.loads(file.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{file}: not valid JSON ({_reason(exc)}); {DAMAGED}") from exc
        stack = cls(path, _upgraded(manifest, path, file))
        stack.verify(hashes=stack.size() <= HASH_AT_OPEN)
        return stack

    # -- contents ------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return [d["name"] for d in self.manifest["domains"]]

    @property
    def generation(self) -> int:
        return self.manifest["generation"]

    def domain_entry(self, name: str) -> dict[str, Any]:
        for entry in self.manifest["domains"]:
            if entry["name"] == name:
                return entry
        raise UserError(
            f"{self.path}: no domain {name!r}; the stack has: {', '.join(self.domains) or 'none'}"
        )

    def adapter_dir(self, domain: str) -> Path:
        """The folder of the adapter that answers `domain`."""
        return self.path / self.manifest["adapters"][self.domain_entry(domain)["adapter"]]

    def component(self, key: str) -> Path | None:
        """The committed file of `backbone`, `backbone_config`, `router` or `method_state`."""
        rel = _components(self.manifest).get(key)
        return self.path / rel if rel else None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT

    def check_base(self, base: dict[str, str]) -> None:
        """Refuse a base model whose name or weights differ from the stack's."""
        own = self.manifest["base_model"]
        if own.get("sha256") and base.get("sha256") and own["sha256"] != base["sha256"]:
            raise UserError(
                f"{self.path}: stack was trained on base {own['name']} (sha256 {own['sha256'][:12]}…), "
                f"not {base['name']} (sha256 {base['sha256'][:12]}…)"
            )
        if not (own.get("sha256") and base.get("sha256")) and own["name"] != base["name"]:
            raise UserError(
                f"{self.path}: stack was trained on base {own['name']}, not {base['name']}"
            )

    # -- integrity -------------------------------------------------------------------------
    def size(self) -> int:
        return sum(entry.get("size", 0) for entry in self.manifest["files"].values())

    def verify(self, hashes: bool) -> None:
        """Every committed file is there with its recorded size (and sha256 if `hashes`)."""
        for rel, entry in self.manifest["files"].items():
            file = self.path / rel
            if not file.is_file():
                raise UserError(f"{file}: missing; {DAMAGED}")
            size = file.stat().st_size
            if "size" in entry and size != entry["size"]:
                raise UserError(
                    f"{file}: {size} bytes, the manifest recorded {entry['size']} "
                    f"(truncated or replaced); {DAMAGED}"
                )
            if hashes and "sha256" in entry and file_sha256(file) != entry["sha256"]:
                raise UserError(
                    f"{file}: sha256 differs from the manifest's (corrupted or replaced); {DAMAGED}"
                )

    def changed_on_disk(self) -> bool:
        """Whether another process committed since this manifest was read."""
        try:
            on_disk = json.loads((self.path / MANIFEST).read_bytes()).get("generation", 0)
        except (OSError, ValueError):
            on_disk = 0
        return on_disk != self.generation

    # -- writing -------------------------------------------------------------------------
    def begin_commit(self) -> Commit:
        return Commit(self)

    def clear_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def collect_garbage(self) -> None:
        """Delete stack files no committed manifest lists: an earlier generation's, or a killed
        commit's. Only the writer calls it, holding the lock."""
        keep = set(_components(self.manifest).values()) | set(self.manifest["adapters"].values())
        adapters = self.path / ADAPTERS
        entries = [*self.path.iterdir(), *(adapters.iterdir() if adapters.is_dir() else [])]
        for entry in entries:
            rel = entry.relative_to(self.path).as_posix()
            top = entry.parent == self.path
            if rel in keep or (
                top and not (_COMMITTED.match(entry.name) or is_temporary(entry.name))
            ):
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class Commit:
    """The next generation of a stack: its files go where no committed manifest points, and
    `finish` makes them the stack in one rename."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.generation = stack.generation + 1
        self.manifest = copy.deepcopy(stack.manifest)
        self._listed = set(stack.manifest["files"]) | set(stack.manifest["adapters"].values())

    def fresh(self, canonical: str) -> str:
        """`canonical`, or its versioned name while the committed manifest lists it."""
        if canonical not in self._listed:
            return canonical
        p = PurePosixPath(canonical)
        return str(p.with_name(f"{p.stem}.{self.generation}{p.suffix}"))

    def write(self, canonical: str, write: Callable[[Path], None], folder: bool = False) -> str:
        """Write a file (or a folder, `write` filling it) atomically under a fresh name."""
        rel = self.fresh(canonical)
        with atomic_path(self.stack.path / rel) as tmp:
            if folder:
                tmp.mkdir()
            write(tmp)
        return rel

    def write_json(self, canonical: str, obj: object) -> str:
        return self.write(canonical, lambda tmp: write_json(tmp, obj))

    def set_component(self, key: str, rel: str | None) -> None:
        if rel is None:
            self.manifest.pop(key, None)
        else:
            self.manifest[key] = rel

    def record_domain(self, entry: dict[str, Any], adapter_dir: str, replace: bool = False) -> None:
        """Add (or replace) a finished domain whose adapter `entry["adapter"]` is in `adapter_dir`."""
        domains = self.manifest["domains"]
        names = [d["name"] for d in domains]
        entry = {**entry, "finished": _now()}
        if entry["name"] in names:
            if not replace:
                raise UserError(
                    f"{self.stack.path}: domain {entry['name']!r} already exists; pass --replace"
                )
            domains[names.index(entry["name"])] = entry
        else:
            domains.append(entry)
        self.manifest["adapters"][entry["adapter"]] = adapter_dir

    def finish(self) -> None:
        """The commit point: the new manifest replaces the old; then old files are deleted."""
        m = self.manifest
        used = {d["adapter"] for d in m["domains"]}
        m["adapters"] = {k: v for k, v in m["adapters"].items() if k in used}
        m["format"], m["generation"] = FORMAT_VERSION, self.generation
        m["files"] = self._file_table()
        self.stack.path.mkdir(parents=True, exist_ok=True)
        write_json(self.stack.path / MANIFEST, m)
        self.stack.manifest = m
        self.stack.collect_garbage()

    def _file_table(self) -> dict[str, dict[str, Any]]:
        old = self.stack.manifest["files"]
        table = {}
        for rel in sorted(_listed_files(self.stack.path, self.manifest)):
            if "sha256" in old.get(rel, {}):
                table[rel] = old[rel]
            else:
                file = self.stack.path / rel
                table[rel] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
        return table


# -- manifest structure -----------------------------------------------------------------------


def _components(manifest: dict[str, Any]) -> dict[str, str]:
    """Committed single files by role: backbone, backbone_config, router, method_state."""
    roles = {
        k: manifest[k] for k in ("backbone", "backbone_config", "method_state") if manifest.get(k)
    }
    router = manifest.get("router") or {}
    if router.get("file"):
        roles["router"] = router["file"]
    return roles


def _listed_files(root: Path, manifest: dict[str, Any]) -> Iterator[str]:
    yield from _components(manifest).values()
    for folder in manifest["adapters"].values():
        for file in sorted((root / folder).iterdir()):
            yield f"{folder}/{file.name}"


def _upgraded(manifest: Any, path: Path, file: Path) -> dict[str, Any]:
    """The manifest in this format, checked for the fields crma reads (format 1 upgraded)."""
    if not isinstance(manifest, dict):
        raise UserError(f"{file}: not a crma manifest (not a JSON object); {DAMAGED}")
    version = manifest.get("format")
    if version not in (1, FORMAT_VERSION):
        raise UserError(
            f"{file}: stack format {version!r}; this crma reads formats 1 and {FORMAT_VERSION} "
            "(a newer crma wrote it?)"
        )
    if version == 1:
        manifest = _from_format_1(manifest, path)
    try:
        _check_fields(manifest)
    except (KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"{file}: missing or malformed field ({exc!r}); {DAMAGED}") from None
    return manifest


def _check_fields(m: dict[str, Any]) -> None:
    assert isinstance(m["generation"], int) and isinstance(m["method"], str)
    assert isinstance(m["base_model"]["name"], str) and isinstance(m["configs"], dict)
    adapters, names = m["adapters"], [d["name"] for d in m["domains"]]
    assert all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
    assert all(d["adapter"] in adapters for d in m["domains"]), "adapter without folder"
    for rel in [*adapters.values(), *_components(m).values(), *m["files"]]:
        parts = PurePosixPath(rel).parts
        assert isinstance(rel, str) and ".." not in parts and not rel.startswith("/"), rel


def _from_format_1(m: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 1: fixed file names, adapters in adapters/<adapter name>/, no file table.

    The files are listed without sizes (the next commit records them); adapters are found
    through each domain's `adapter`, the folder name format 1 used.
    """
    m = dict(m)
    m["generation"] = 0
    m["adapters"] = {d["adapter"]: f"{ADAPTERS}/{d['adapter']}" for d in m.get("domains", [])}
    for key, name in (
        ("backbone", BACKBONE_FILE),
        ("backbone_config", BACKBONE_CONFIG),
        ("method_state", METHOD_STATE),
    ):
        if (path / name).is_file():
            m[key] = name
    m["files"] = {}
    missing = [f for f in m["adapters"].values() if not (path / f).is_dir()]
    if missing:
        raise UserError(f"{path / missing[0]}: missing; {DAMAGED}")
    m["files"] = {rel: {} for rel in _listed_files(path, m)}
    return m


def _stack_owned(name: str) -> bool:
    """Names a stack's directory may hold before its first commit."""
    return (
        name in (CHECKPOINT, METRICS, STREAM_LOG, LOCK_FILE, ADAPTERS)
        or bool(_COMMITTED.match(name))
        or is_temporary(name)
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}, line {exc.lineno}"
    return "not UTF-8"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
