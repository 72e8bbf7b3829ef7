"""What one `crma serve` process holds: the served stack, its batcher, files and jobs."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from crma.generate import load_stack
from crma.routing.router import RouteSettings
from crma.serve.batcher import Batcher
from crma.serve.config import ServeSettings
from crma.serve.errors import APIError
from crma.serve.files import Files
from crma.serve.jobs import Scheduler
from crma.serve.metrics import Metrics
from crma.serve.snapshot import Snapshot
from crma.serve.store import Store
from crma.train import TrainConfig

log = logging.getLogger(__name__)
SERVE_DIR = "serve"  # inside the stack: serve.sqlite, files/, jobs/<id>/


class Server:
    """Everything one `crma serve` process holds."""

    def __init__(
        self,
        stack: str | Path,
        settings: ServeSettings | None = None,
        api_key: str | None = None,
        base: str | None = None,
        route: RouteSettings | None = None,
        train: TrainConfig | None = None,
    ):
        self.stack = Path(stack)
        self.settings = settings or ServeSettings()
        self.api_key, self.base, self.route = api_key or None, base, route
        serve_dir = self.stack / SERVE_DIR
        self.metrics = Metrics()
        self.batcher = Batcher(self.settings, self.metrics)
        self.store = Store(serve_dir / "serve.sqlite")
        self.files = Files(serve_dir / "files", self.store)
        self.scheduler = Scheduler(
            self.stack,
            serve_dir,
            self.store,
            self.files,
            train or TrainConfig(),
            base,
            self.reload,
            self.settings.job_nice,
        )
        self.load_error: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._first_load, name="crma-load", daemon=True).start()

    def _first_load(self) -> None:
        try:
            self.batcher.swap(self.load())
        except Exception as exc:  # reported by /health; the process stays up to say so
            log.exception("cannot load %s", self.stack)
            self.load_error = str(exc)
            return
        self.scheduler.start()

    def load(self) -> Snapshot:
        snapshot = Snapshot(load_stack(self.stack, self.base, self.route), self.settings)
        snapshot.warm_up()
        return snapshot

    def reload(self) -> None:
        """Load the committed stack beside the served one and swap once in-flight rows finish."""
        self.batcher.swap(self.load()).wait()

    def close(self) -> None:
        self.scheduler.stop()
        self.batcher.close()

    def snapshot(self) -> Snapshot:
        snap = self.batcher.snapshot
        if snap is None:
            raise APIError(
                503, self.load_error or "the stack is loading; retry shortly", None, "loading"
            )
        return snap
