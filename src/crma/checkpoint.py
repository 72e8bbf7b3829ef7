"""A task's checkpoint while it trains: where it lives, what may resume it, and its state."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from crma.errors import UserError

CHECKPOINT_FILE = "state.safetensors"


@dataclass
class Checkpoint:
    """Where a task's checkpoint lives and what may resume it."""

    directory: Path
    metrics: Path
    resume_key: str
    generation: int
    metrics_start: int = 0  # the metrics file's size when this task began
    last_loss: float | None = None  # the last step's loss (None before step 1)
    shares: list[list[int]] = field(default_factory=list)  # per process: examples, tokens

    def add_shares(self, step: list[list[int]]) -> None:
        self.shares = [
            [a + b for a, b in zip(mine, new, strict=True)]
            for mine, new in zip(self.shares or [[0, 0]] * len(step), step, strict=True)
        ]

    @property
    def file(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def state(self) -> dict[str, Any] | None:
        return checkpoint_state(self.directory)

    def last_step(self) -> int:
        state = self.state()
        return state["step"] if state and state.get("resume_key") == self.resume_key else 0

    def stop_unless_finite(self, domain: str, step: int, finite: dict[str, bool]) -> None:
        """A UserError naming the domain and step when a loss, gradient or weight is
        NaN/infinite: the step is not taken, nothing is committed, the last checkpoint stays."""
        for what, ok in finite.items():
            if not ok:
                raise UserError(
                    f"domain {domain!r}: non-finite {what} at step {step + 1}; nothing was "
                    f"committed (the checkpoint at step {self.last_step()} is kept); lower the "
                    "learning rate or check the data"
                )


def checkpoint_state(directory: Path) -> dict[str, Any] | None:
    """A checkpoint's step, keys, generation and offsets; None if there is none (or it is
    unreadable: one from an older crma, or damaged)."""
    try:
        with safe_open(str(directory / CHECKPOINT_FILE), framework="pt") as fh:
            return json.loads(fh.metadata()["state"])
    except Exception:  # missing, damaged or older layout: start the task afresh
        return None


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
