"""benchmarks/gpu_check.py runs end to end on its tiny CPU shape, so it does not rot between
the sessions that have a GPU to run it at 7B shape."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT, crma_env


@pytest.mark.integration
def test_tiny_run_prints_both_arms_and_the_spectral_bound():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--tiny", "--steps", "2"],
        capture_output=True, text=True, env=crma_env(), timeout=300, check=True,
    )  # fmt: skip
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| float32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    on, off = (float(x) for x in cells[1].split(" / "))
    assert on > 0 and off > 0
    assert float(cells[6]) < 1e-5  # Sinkhorn keeps ‖M‖₂ at 1 while the backbone trains
    backbone, lora = (int(x.replace(",", "")) for x in cells[7].split(" / "))
    # 2 layers × (2·n·d + n² + 1) with n = 4, d = 64; LoRA r=16 on 7 projections of 2 layers
    assert backbone == 2 * (2 * 4 * 64 + 16 + 1)
    assert lora == 2 * 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert re.search(r"\| 4-bit NF4 \| skipped: needs CUDA", proc.stdout)
