"""What a run's numbers were computed on, recorded in every loss matrix so that results are
never mixed across data: `--reuse` and resuming compare it, reports print it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crma.model import file_sha256

# Embedded-corpus results written before the corpus recorded its tag (format 1: the holdout was
# not yet filtered for templated near-duplicates).
LEGACY_CORPUS = "v1"


def data_identity(user_domains: list[Any]) -> dict[str, Any]:
    """The embedded corpus's tag (it changes with any package, Python or builder version) when
    no user domains are given, else the sha256 of each user domain's train and holdout files."""
    if not user_domains:
        from crma.data.corpus import corpus_tag

        return {"corpus": corpus_tag()}
    return {
        "files": {
            d.name: {"train": file_sha256(d.train), "holdout": file_sha256(d.holdout)}
            for d in user_domains
        }
    }


def recorded_data(unit: Path, embedded: bool) -> dict[str, Any] | None:
    """The data identity a (method, seed) folder's loss matrix was computed on; units from
    before it was recorded: the legacy corpus, or None (unknown) for user files."""
    data = json.loads((unit / "loss_matrix.json").read_text())
    return data.get("data") or ({"corpus": LEGACY_CORPUS} if embedded else None)


def describe_data(data: list[dict[str, Any]]) -> str:
    """One phrase per distinct data identity, for reports."""

    def one(d: dict[str, Any]) -> str:
        if d.get("corpus") == LEGACY_CORPUS:
            return (
                "embedded corpus format 1 (its holdout not yet filtered for templated "
                "near-duplicates; tag not recorded)"
            )
        if "corpus" in d:
            return f"embedded corpus {d['corpus']}"
        return "the user's files (sha256 in report.json)"

    return "; ".join(one(d) for d in data)
