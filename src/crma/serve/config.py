"""Limits of a `crma serve` process (each becomes a `--option` of the command)."""

from __future__ import annotations

from dataclasses import dataclass

from crma.settings import setting


@dataclass
class ServeSettings:
    """Serving limits."""

    max_batch: int = setting(32, "rows decoded together at most (continuous batching)")
    max_queue: int = setting(512, "requests waiting for a batch slot at most; beyond: 429")
    max_tokens: int = setting(1024, "largest max_tokens a request may ask for")
    max_context: int | None = setting(
        None, "prompt + completion tokens at most (default: the model's context length)"
    )
    max_n: int = setting(8, "choices per request (n) at most")
    max_body_bytes: int = setting(1 << 20, "largest JSON request body; beyond: 413")
    max_file_bytes: int = setting(64 << 20, "largest uploaded file; beyond: 413")
    request_timeout: float = setting(600.0, "seconds a request may wait and decode in total")
    job_nice: int = setting(10, "niceness of the fine-tuning worker process: serving comes first")
