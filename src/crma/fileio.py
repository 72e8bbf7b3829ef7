"""Atomic writes: a file or directory appears complete or not at all."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TMP = ".tmp"  # temporaries are `.<name>.tmp<pid>/<name>`, beside the target


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and directories (an existing directory at `path` is replaced). A temporary
    left by a process killed mid-write is removed by the next write of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp_dir = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary of `atomic_path` (or the old side of a directory swap)."""
    stem, _, pid = name.rpartition(_TMP)
    return name.startswith(".") and ((bool(stem) and pid.isdigit()) or name.endswith(".old"))


def _remove_stale_temporaries(path: Path) -> None:
    pattern = f".{glob.escape(path.name)}{_TMP}*"
    for tmp in path.parent.glob(pattern):
        pid = tmp.name.rpartition(_TMP)[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    """Strict JSON: a NaN or infinity is a bug upstream, never written (other parsers refuse it)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
