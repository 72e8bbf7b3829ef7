"""Fine-tuning jobs: checked on creation, run one at a time in a worker process, followed
through the trainer's metrics.jsonl (its per-step lines become the job's events).

States: validating_files -> queued -> running -> succeeded | failed | cancelled. A job found
`running` when the server starts was interrupted by a kill: it is queued again, and its worker
resumes from the stack's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.fileio import write_json
from crma.serve.errors import APIError
from crma.serve.files import Files
from crma.serve.schemas import JobRequest
from crma.serve.snapshot import BASE_MODEL
from crma.serve.store import Store, new_id
from crma.stack import Stack, check_domain_name
from crma.train import TrainConfig

log = logging.getLogger(__name__)
POLL_S = 0.5
METRIC_FIELDS = {  # metrics.jsonl key -> event data key (OpenAI's names where it has them)
    "step": "step",
    "loss": "train_loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "grad_norm_clipped": "grad_norm_clipped",
    "spectral_norm_max": "spectral_norm_max",
    "rowsum_err_max": "rowsum_err_max",
    "colsum_err_max": "colsum_err_max",
    "tokens_per_s": "tokens_per_s",
}


class Scheduler:
    """Creates, runs and cancels jobs; `commit()` makes the server serve the grown stack."""

    def __init__(
        self,
        stack: Path,
        serve_dir: Path,
        store: Store,
        files: Files,
        train: TrainConfig,
        base: str | None,
        commit: Callable[[], None],
        nice: int = 0,
    ):
        self.stack, self.serve_dir, self.store, self.files = stack, serve_dir, store, files
        self.train, self.base, self.commit, self.nice = train, base, commit, nice
        self._wake = threading.Event()
        self._stopping = False
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="crma-jobs", daemon=True)

    def start(self) -> None:
        for job in self.store.jobs(limit=10**9):
            if job["status"] in ("running", "validating_files") and job["cancel"]:
                Stack.open(self.stack).clear_checkpoint()
                self.store.update_job(job["id"], status="cancelled")
                self.store.add_event(job["id"], "Job cancelled")
            elif job["status"] in ("running", "validating_files"):
                self.store.update_job(job["id"], status="queued")
                self.store.add_event(job["id"], "Server restarted; the job resumes")
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (its job stays `running`, so the next start resumes it)."""
        self._stopping = True
        self._wake.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self._thread.join(timeout=30)

    # -- API -----------------------------------------------------------------------------------
    def create(self, body: JobRequest, domains: list[str]) -> dict[str, Any]:
        stack_name = self.stack.resolve().name
        if body.model not in ("auto", stack_name):
            raise APIError(
                400,
                f"model {body.model!r}: fine-tune 'auto' or {stack_name!r} (this stack)",
                "model",
                "model_not_available",
            )
        suffix = self._check_suffix(body.suffix, domains)
        self.files.get(body.training_file, "training_file")
        if body.route_examples is not None:
            self.files.get(body.route_examples, "metadata.route_examples")
        hp = body.hyperparameters
        resolved = {
            "n_epochs": self.train.epochs if hp.n_epochs == "auto" else hp.n_epochs,
            "batch_size": self.train.batch_size if hp.batch_size == "auto" else hp.batch_size,
            "learning_rate_multiplier": 1.0
            if hp.learning_rate_multiplier == "auto"
            else hp.learning_rate_multiplier,
        }
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job_id = new_id("ftjob")
        self.store.add_job(
            {
                "id": job_id,
                "model": body.model,
                "training_file": body.training_file,
                "suffix": suffix,
                "hyperparameters": resolved,
                "seed": seed,
                "metadata": body.metadata,
            }
        )
        self.store.add_event(job_id, f"Validating training file: {body.training_file}")
        self.store.update_job(job_id, status="queued")
        self.store.add_event(job_id, f"Fine-tuning job queued: new domain {suffix!r}")
        self._wake.set()
        return self.get(job_id)

    def _check_suffix(self, suffix: str | None, domains: list[str]) -> str:
        if not suffix:
            raise APIError(400, "suffix: name the new domain (letters, digits, _ -)", "suffix")
        try:
            check_domain_name(suffix)
        except UserError as exc:
            raise APIError(400, f"suffix: {exc}", "suffix", "invalid_suffix") from exc
        if suffix in ("auto", BASE_MODEL):
            raise APIError(400, f"suffix {suffix!r} is a reserved model name", "suffix")
        if suffix in domains or suffix in self.store.active_suffixes():
            raise APIError(409, f"the stack already has a domain {suffix!r}", "suffix", "exists")
        return suffix

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.store.job(job_id) if job_id.startswith("ftjob-") else None
        if job is None:
            raise APIError(404, f"no fine-tuning job {job_id!r}", "fine_tuning_job_id")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if self.store.set_status_if(job_id, ("validating_files", "queued"), "cancelled"):
            self.store.add_event(job_id, "Job cancelled")
        elif job["status"] == "running":
            self.store.update_job(job_id, cancel=1)
            self._wake.set()
        else:
            raise APIError(409, f"job {job_id} is {job['status']}; it cannot be cancelled", None)
        return self.get(job_id)

    # -- the worker loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(POLL_S * 4)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as exc:  # a broken job must not stop the scheduler
                log.exception("job %s", job["id"])
                self._fail(job, f"internal error: {exc}")

    def _run(self, job: dict[str, Any]) -> None:
        if not self.store.set_status_if(job["id"], ("queued",), "running"):
            return
        metrics = self.stack / "metrics.jsonl"
        start = job["metrics_from"]
        if start is None:  # where this job's lines begin: metrics.jsonl keeps every domain's
            start = metrics.stat().st_size if metrics.exists() else 0
            self.store.update_job(job["id"], metrics_from=start)
        self.store.add_event(job["id"], "Fine-tuning job started")
        spec = self._spec(job)
        with open(spec.with_name("worker.log"), "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "crma.serve.worker", str(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            seen = (start, b"")
            while self._proc.poll() is None:
                seen = self._tail(job, metrics, start, seen)
                if self._stopping:
                    return
                if self.store.job(job["id"])["cancel"]:
                    self._proc.terminate()
                self._wake.wait(POLL_S)
                self._wake.clear()
        self._tail(job, metrics, start, seen)
        self._finish(job, spec.with_name("result.json"), self._proc.returncode)

    def _spec(self, job: dict[str, Any]) -> Path:
        directory = self.serve_dir / "jobs" / job["id"]
        directory.mkdir(parents=True, exist_ok=True)
        hp = job["hyperparameters"]
        train = dataclasses.replace(
            self.train,
            epochs=hp["n_epochs"],
            batch_size=hp["batch_size"],
            lr=self.train.lr * hp["learning_rate_multiplier"],
        )
        spec = directory / "spec.json"
        (directory / "result.json").unlink(missing_ok=True)
        write_json(
            spec,
            {
                "job": job["id"],
                "stack": str(self.stack),
                "serve_dir": str(self.serve_dir),
                "base": self.base,
                "domain": job["suffix"],
                "file": str(self.files.path(job["training_file"])),
                "route_file": str(self.files.path(route)) if (route := route_file(job)) else None,
                "seed": job["seed"],
                "train": dataclasses.asdict(train),
                "nice": self.nice,
            },
        )
        return spec

    def _tail(
        self, job: dict[str, Any], metrics: Path, start: int, seen: tuple[int, bytes]
    ) -> tuple[int, bytes]:
        """Record the new complete lines of metrics.jsonl as events.

        `seen` is (offset read up to, the line that ends there). A resumed trainer cuts the
        lines after its checkpoint and writes them again: when the file no longer holds that
        line there, reading starts over at the job's first line (events are keyed by step,
        so nothing doubles).
        """
        offset, last = seen
        if not metrics.exists():
            return seen
        with open(metrics, "rb") as fh:
            fh.seek(offset - len(last))
            if fh.read(len(last)) != last:
                offset, last = start, b""
            fh.seek(offset)
            chunk = fh.read()
        lines = chunk[: chunk.rfind(b"\n") + 1].splitlines(keepends=True)
        for raw in lines:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:  # never from the trainer; not worth failing a job
                log.warning("%s: skipped a line that is not JSON", metrics)
                continue
            if line.get("domain") == job["suffix"]:
                data = {out: line[key] for key, out in METRIC_FIELDS.items() if key in line}
                message = f"Step {line['step']}: training loss={line['loss']:.4f}"
                self.store.add_event(job["id"], message, data=data, step=line["step"])
        return offset + sum(map(len, lines)), lines[-1] if lines else last

    def _finish(self, job: dict[str, Any], result_file: Path, code: int) -> None:
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        job_id = job["id"]
        if self.store.job(job_id)["cancel"]:
            Stack.open(self.stack).clear_checkpoint()
            self.store.update_job(job_id, status="cancelled")
            self.store.add_event(job_id, "Job cancelled")
        elif code == 0 and result.get("ok"):
            self.commit()
            self.store.update_job(job_id, status="succeeded", fine_tuned_model=job["suffix"])
            self.store.add_event(
                job_id,
                f"New domain {job['suffix']!r} committed after {result['steps']} steps "
                f"(final loss {result['final_train_loss']:.4f}); served and routed",
                data=result,
            )
        else:
            self._fail(job, result.get("error") or f"the worker exited with code {code}")

    def _fail(self, job: dict[str, Any], message: str) -> None:
        Stack.open(self.stack).clear_checkpoint()
        self.store.update_job(
            job["id"],
            status="failed",
            error={"code": "training_failed", "message": message, "param": None},
        )
        self.store.add_event(job["id"], f"Job failed: {message}", level="error")


def route_file(job: dict[str, Any]) -> str | None:
    """The file id of the job's route examples, if it has any."""
    return (job["metadata"] or {}).get("route_examples")


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI fine-tuning job object."""
    hp = job["hyperparameters"]
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
        "model": job["model"],
        "fine_tuned_model": job["fine_tuned_model"],
        "organization_id": "crma",
        "result_files": [],
        "status": job["status"],
        "validation_file": None,
        "training_file": job["training_file"],
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "trained_tokens": job["trained_tokens"],
        "error": job["error"],
        "seed": job["seed"],
        "user_provided_suffix": job["suffix"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": job["metadata"],
    }
