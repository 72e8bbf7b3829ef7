"""Helpers for the `crma serve` tests: an in-process app, a server process, polling."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from fastapi.testclient import TestClient
from helpers import ROOT, crma_cmd, crma_env

from crma.serve.app import create_app
from crma.serve.server import Server
from crma.train import TrainConfig

KEY = "test-key"
# Jobs on the tiny model: short sequences, the tiny-stack learning rate, exact fp32.
JOB_TRAIN = TrainConfig(lr=0.03, max_length=32, precision="fp32", checkpoint_every=5)
JOB_ARGS = [
    *("--train-lr", "0.03", "--train-max-length", "32"),
    *("--train-precision", "fp32", "--train-checkpoint-every", "5"),
    *("--job-nice", "0"),  # the test waits for the job: no reason to yield the CPU
]


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def app_client(server: Server) -> Iterator[TestClient]:
    """A started in-process server (its lifespan runs) once /health says it serves."""
    with TestClient(create_app(server), headers={"Authorization": f"Bearer {KEY}"}) as client:
        wait_for(lambda: client.get("/health").status_code == 200, 60, "the stack to load")
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(stack: Path, port: int, *extra: str) -> Iterator[subprocess.Popen]:
    """`crma serve STACK` as a real process on 127.0.0.1:port; always killed at the end."""
    log = open(stack.parent / f"serve-{port}.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        crma_cmd("serve", str(stack), "--port", str(port), "--api-key", KEY, *JOB_ARGS, *extra),
        cwd=ROOT,
        env=crma_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _healthy(proc, port), 120, "crma serve to answer /health", every=0.3)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


def _healthy(proc: subprocess.Popen, port: int) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"crma serve exited with code {proc.returncode}")
    try:
        return httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False
