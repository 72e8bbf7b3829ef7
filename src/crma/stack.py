"""A stack: the on-disk state of a continually trained model (DESIGN §6).

    STACK/manifest.json                base model id + hash, method, configs, domain history
    STACK/crma_backbone.safetensors    shared CRMA backbone (+ crma_config.json)
    STACK/adapters/<adapter>/          PEFT LoRA adapters, loadable by plain `peft`
    STACK/method_state.safetensors     method state across domains (Fisher, buffers), if any
    STACK/checkpoint/                  an unfinished domain's training state (resume)

Every file is written atomically; the manifest is written last and is the commit point: a
domain exists once the manifest lists it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.fileio import atomic_path, write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': PEFT splits names on it
# Names taken by something else: shared adapters (named after their method, or OSF's
# "subspace"), PEFT's default adapter, the checkpoint folder.
_RESERVED = {"checkpoint", "subspace", "default"}
# PEFT matches adapter names inside parameter names; a name inside its prefixes ("a", "lora")
# would match the wrong parameters.
_PEFT_PREFIXES = ("lora_", "osf_")


def check_domain_name(name: str) -> str:
    from crma.methods import METHODS

    taken = name in _RESERVED or name in METHODS or any(name in p for p in _PEFT_PREFIXES)
    if not _NAME.match(name) or taken:
        raise UserError(
            f"domain name {name!r}: use letters, digits, '_' and '-' (up to 64); not a method "
            f"name, {', '.join(sorted(_RESERVED))}, nor part of {' or '.join(_PEFT_PREFIXES)}"
        )
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
    def create(
        cls, path: str | Path, base: dict[str, str], method: str, configs: dict[str, Any]
    ) -> Stack:
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not cls.exists(path):
            raise UserError(
                f"{path}: exists and is not a crma stack; choose an empty or new directory"
            )
        manifest = {
            "format": FORMAT_VERSION,
            "base_model": base,
            "method": method,
            "configs": configs,
            "domains": [],
            "created": _now(),
        }
        stack = cls(path, manifest)
        stack.commit()
        return stack

    @classmethod
    def open(cls, path: str | Path) -> Stack:
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise UserError(f"{path}: not a crma stack (no {MANIFEST})")
        try:
            manifest = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{file}: invalid JSON ({exc.msg}, line {exc.lineno}); the stack is damaged"
            ) from exc
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(f"{file}: unsupported stack format {manifest.get('format')!r}")
        return cls(path, manifest)

    # -- contents ------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return [d["name"] for d in self.manifest["domains"]]

    def domain_entry(self, name: str) -> dict[str, Any]:
        for entry in self.manifest["domains"]:
            if entry["name"] == name:
                return entry
        raise UserError(
            f"{self.path}: no domain {name!r}; the stack has: {', '.join(self.domains) or 'none'}"
        )

    def adapter_dir(self, adapter: str) -> Path:
        return self.path / "adapters" / adapter

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

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

    # -- writing -------------------------------------------------------------------------
    def record_domain(self, entry: dict[str, Any], replace: bool = False) -> None:
        """Add (or replace) a finished domain's entry; call `commit` to make it visible."""
        domains = self.manifest["domains"]
        names = [d["name"] for d in domains]
        entry = {**entry, "finished": _now()}
        if entry["name"] in names:
            if not replace:
                raise UserError(
                    f"{self.path}: domain {entry['name']!r} already exists; pass --replace"
                )
            domains[names.index(entry["name"])] = entry
        else:
            domains.append(entry)

    def commit(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / MANIFEST, self.manifest)

    def write_adapter(self, adapter: str, save) -> None:
        """Write an adapter folder atomically; `save(tmp_dir)` writes `tmp_dir/<adapter>/`."""
        target = self.adapter_dir(adapter)
        with atomic_path(target) as tmp:
            tmp.mkdir()
            save(tmp.parent)  # PEFT writes non-default adapters into <dir>/<adapter>/
        if not (target / "adapter_config.json").is_file():
            raise RuntimeError(f"adapter {adapter} was not written to {target}")

    def clear_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
