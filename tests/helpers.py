"""Helpers shared by the CLI and protocol tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = ROOT / "tests" / "assets" / "tiny-llama"
TINY_DATA = ROOT / "tests" / "assets" / "tiny-domains"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def kill_harness():
    """benchmarks/kill_trials.py: kill points, trials, tree comparison."""
    from benchmarks import kill_trials

    return kill_trials


def crma_env() -> dict[str, str]:
    """One thread everywhere, so two runs of the same command give bit-identical numbers."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def committed(stack: Path, key: str) -> Path:
    """A stack's committed `backbone`, `router`, ... file, found through its manifest (a commit
    writes a rewritten file under a new name)."""
    from crma.stack import Stack

    path = Stack.open(stack).component(key)
    assert path is not None, f"{stack}: no {key}"
    return path


def adapter_file(stack: Path, domain: str) -> Path:
    """The committed adapter_model.safetensors that answers `domain`."""
    from crma.stack import Stack

    return Stack.open(stack).adapter_dir(domain) / "adapter_model.safetensors"


def crma_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "crma", *args]


def run_crma(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(crma_cmd(*args), cwd=ROOT, env=crma_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"crma {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc
