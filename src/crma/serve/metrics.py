"""Prometheus metrics of one server (its own registry, so several apps can live in one test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "crma_requests",
            "API requests answered, by endpoint, requested model, answering domain and status",
            ["endpoint", "model", "domain", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "crma_prompt_tokens", "prompt tokens", ["model", "domain"], registry=r
        )
        self.completion_tokens = Counter(
            "crma_completion_tokens", "completion tokens", ["model", "domain"], registry=r
        )
        self.router_confidence = Histogram(
            "crma_router_confidence",
            "confidence of the routed domain (model 'auto')",
            buckets=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.queue_depth = Gauge("crma_queue_depth", "requests waiting for a batch", registry=r)
        self.batch_size = Histogram(
            "crma_batch_size", "rows per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "crma_request_latency_seconds",
            "time from request to last token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "crma_time_to_first_token_seconds",
            "time from request to first streamed text",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge(
            "crma_fine_tuning_jobs", "fine-tuning jobs by state", ["status"], registry=r
        )

    def render(self, job_counts: dict[str, int]) -> bytes:
        for status in ("validating_files", "queued", "running", "succeeded", "failed", "cancelled"):
            self.jobs.labels(status).set(job_counts.get(status, 0))
        return generate_latest(self.registry)
