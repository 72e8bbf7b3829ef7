"""Files, fine-tuning jobs and their events in SQLite inside the stack (`serve/serve.sqlite`).

WAL mode: readers never wait for the writer, and a committed row survives the process being
killed. One connection, guarded by a lock, serves every thread of the server.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, created_at INTEGER, filename TEXT, purpose TEXT, bytes INTEGER,
    rows INTEGER, report TEXT, deleted INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER, model TEXT, training_file TEXT, suffix TEXT,
    hyperparameters TEXT, seed INTEGER, status TEXT, error TEXT, finished_at INTEGER,
    fine_tuned_model TEXT, trained_tokens INTEGER, cancel INTEGER DEFAULT 0,
    metrics_from INTEGER, metadata TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, job_id TEXT, created_at INTEGER,
    level TEXT, message TEXT, type TEXT, data TEXT, step INTEGER, UNIQUE (job_id, step));
"""
ACTIVE = ("validating_files", "queued", "running")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "metadata" not in columns:  # a store written before jobs kept their metadata
                self._db.execute("ALTER TABLE jobs ADD COLUMN metadata TEXT")

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- files ------------------------------------------------------------------------------
    def add_file(self, file_id: str, filename: str, size: int, rows: int, report: dict) -> None:
        self._run(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, rows, report) "
            "VALUES (?, ?, ?, 'fine-tune', ?, ?, ?)",
            (file_id, int(time.time()), filename, size, rows, json.dumps(report)),
        )

    def file(self, file_id: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))
        return _file(rows[0]) if rows else None

    def files(self) -> list[dict[str, Any]]:
        return [_file(r) for r in self._run("SELECT * FROM files WHERE deleted = 0 ORDER BY rowid")]

    def delete_file(self, file_id: str) -> None:
        self._run("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))

    # -- jobs -------------------------------------------------------------------------------
    def add_job(self, job: dict[str, Any]) -> None:
        self._run(
            "INSERT INTO jobs (id, created_at, model, training_file, suffix, hyperparameters, "
            "seed, metadata, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'validating_files')",
            (
                job["id"],
                int(time.time()),
                job["model"],
                job["training_file"],
                job["suffix"],
                json.dumps(job["hyperparameters"]),
                job["seed"],
                json.dumps(job["metadata"]) if job.get("metadata") is not None else None,
            ),
        )

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first; `after` is the id of the last job of the previous page."""
        cursor = "AND rowid < (SELECT rowid FROM jobs WHERE id = ?)" if after else ""
        sql = f"SELECT * FROM jobs WHERE 1 {cursor} ORDER BY rowid DESC LIMIT ?"
        return [_job(r) for r in self._run(sql, ((after,) if after else ()) + (limit,))]

    def next_queued(self) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE status = 'queued' ORDER BY rowid LIMIT 1")
        return _job(rows[0]) if rows else None

    def active_suffixes(self) -> set[str]:
        marks = ",".join("?" * len(ACTIVE))
        return {
            r[0] for r in self._run(f"SELECT suffix FROM jobs WHERE status IN ({marks})", ACTIVE)
        }

    def update_job(self, job_id: str, **fields: Any) -> None:
        if fields.get("status") in ("succeeded", "failed", "cancelled"):
            fields.setdefault("finished_at", int(time.time()))
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        names = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def set_status_if(self, job_id: str, old: tuple[str, ...], status: str) -> bool:
        """Move a job from one of `old` to `status`; False if it was in another state."""
        marks = ",".join("?" * len(old))
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status = ?, finished_at = ? WHERE id = ? AND status IN ({marks})",
                (status, int(time.time()) if status == "cancelled" else None, job_id, *old),
            )
            return cur.rowcount == 1

    def count_jobs(self) -> dict[str, int]:
        return dict(self._run("SELECT status, COUNT(*) FROM jobs GROUP BY status"))

    # -- events -----------------------------------------------------------------------------
    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        data: dict | None = None,
        step: int | None = None,
    ) -> None:
        """Record an event; a metrics event per step replaces an earlier one of the same step
        (a resumed job recomputes the steps after its checkpoint, identically)."""
        self._run(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data, step) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, step) DO UPDATE SET "
            "message = excluded.message, data = excluded.data",
            (
                new_id("ftevent"),
                job_id,
                int(time.time()),
                level,
                message,
                "metrics" if step is not None else "message",
                json.dumps(data) if data is not None else None,
                step,
            ),
        )

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first, as OpenAI lists them; `after` is the last event id already seen."""
        cursor = "AND seq < (SELECT seq FROM events WHERE id = ?)" if after else ""
        sql = f"SELECT * FROM events WHERE job_id = ? {cursor} ORDER BY seq DESC LIMIT ?"
        return [_event(r) for r in self._run(sql, (job_id, *((after,) if after else ()), limit))]

    def step_metrics(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The metrics of a job's steps after step `after`, in step order."""
        sql = "SELECT data FROM events WHERE job_id = ? AND step > ? ORDER BY step"
        return [json.loads(r[0]) for r in self._run(sql, (job_id, after))]

    def step_span(self, job_id: str) -> tuple[tuple | None, tuple | None, int]:
        """(step, time) of a job's first and last logged step, and how many steps it logged."""
        rows = self._run(
            "SELECT MIN(step), MAX(step), COUNT(step) FROM events WHERE job_id = ? "
            "AND step IS NOT NULL",
            (job_id,),
        )
        low, high, count = rows[0]
        if not count:
            return None, None, 0
        times = self._run(
            "SELECT step, created_at FROM events WHERE job_id = ? AND step IN (?, ?) ORDER BY step",
            (job_id, low, high),
        )
        return tuple(times[0]), tuple(times[-1]), count


def _file(row: sqlite3.Row) -> dict[str, Any]:
    return {**dict(row), "report": json.loads(row["report"])}


def _job(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["hyperparameters"] = json.loads(row["hyperparameters"])
    out["error"] = json.loads(row["error"]) if row["error"] else None
    out["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    return out


def _event(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": json.loads(row["data"]) if row["data"] else None,
    }
