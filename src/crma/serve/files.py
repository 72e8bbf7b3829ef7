"""Uploaded training files: validated by the data loader, cleaned by the dataset optimizer, and
checked for rows that duplicate rows of the files already stored (`crma data clean` and
`crma data check` on the upload). The cleaned file is what a job trains on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from crma.data.clean import CleanConfig, clean_records, find_contamination
from crma.data.formats import load_records, record_text, write_records
from crma.errors import UserError
from crma.serve.errors import APIError
from crma.serve.store import Store, new_id

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
SUFFIXES = (".jsonl", ".txt")
LEAKS_SHOWN = 10


class Files:
    def __init__(self, root: Path, store: Store):
        self.root, self.store = root, store
        root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        """The cleaned file of `file_id` (ids are checked, so no path leaves `root`)."""
        return self.root / f"{self.check_id(file_id)}.jsonl"

    @staticmethod
    def check_id(file_id: str, param: str = "file_id") -> str:
        if not FILE_ID.match(file_id):
            raise APIError(
                400, f"{param}: {file_id!r} is not a file id (file-<24 hex digits>)", param
            )
        return file_id

    def get(self, file_id: str, param: str = "file_id") -> dict[str, Any]:
        found = self.store.file(self.check_id(file_id, param))
        if found is None:
            raise APIError(404, f"{param}: no file {file_id!r}", param, "file_not_found")
        return found

    def add(self, data: bytes, filename: str) -> dict[str, Any]:
        """Validate, clean and check an upload; store the cleaned rows and the reports."""
        name = Path(filename or "upload.jsonl").name[:200]
        suffix = Path(name).suffix.lower()
        if suffix not in SUFFIXES:
            raise APIError(400, f"{name}: upload a .jsonl or .txt file", "file", "invalid_file")
        file_id = new_id("file")
        raw = self.root / f".{file_id}{suffix}"
        raw.write_bytes(data)
        try:
            records = load_records(raw)
        except UserError as exc:  # names the line; show the client's file name, not ours
            raise APIError(400, str(exc).replace(str(raw), name), "file", "invalid_file") from exc
        finally:
            raw.unlink(missing_ok=True)
        kept, cleaning = clean_records(records, CleanConfig(), where=lambda i: i + 1)
        if not kept:
            raise APIError(
                422, f"{name}: no row is left after cleaning ({cleaning['removed']})", "file"
            )
        contamination = self._contamination(kept)
        write_records(self.path(file_id), kept)
        report = {"cleaning": cleaning, "contamination": contamination}
        self.store.add_file(file_id, name, len(data), len(kept), report)
        return self.get(file_id)

    def _contamination(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of this upload that duplicate rows of the files already stored."""
        stored = [
            (f["id"], record_text(r))
            for f in self.store.files()
            for r in load_records(self.path(f["id"]))
        ]
        mine = [("upload", record_text(r)) for r in rows]
        leaks = find_contamination(stored, mine, CleanConfig()) if stored else []
        for leak in leaks:
            leak["train_file"] = stored[leak.pop("train_row")][0]
            leak.pop("train_domain"), leak.pop("holdout_domain"), leak.pop("scope")
        return {"rows": len(rows), "contaminated": len(leaks), "leaks": leaks[:LEAKS_SHOWN]}

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.store.delete_file(file_id)
        self.path(file_id).unlink(missing_ok=True)


def file_object(f: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI file object, with the optimizer's and the contamination check's report."""
    return {
        "id": f["id"],
        "object": "file",
        "bytes": f["bytes"],
        "created_at": f["created_at"],
        "filename": f["filename"],
        "purpose": f["purpose"],
        "status": "processed",
        "status_details": None,
        "crma": {"rows": f["rows"], **f["report"]},
    }
