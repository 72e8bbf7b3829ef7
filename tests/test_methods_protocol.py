"""The baselines end to end through `crma run` on the tiny conflicting domains (one seed)."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, run_crma

CONFIG = ROOT / "configs" / "tiny-baselines.yaml"
BASELINES = ["ewc", "replay", "lwf", "olora", "inflora"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "run"
    run_crma("run", str(CONFIG), "--out", str(out))
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.integration
def test_each_baseline_forgets_less_than_naive(report, name):
    methods = report["methods"]
    naive = methods["naive"]["per_seed"]["0"]["drift"]
    drift = methods[name]["per_seed"]["0"]["drift"]
    assert naive > 1.0, f"naive should forget the conflicting domains (drift {naive:.3f}%)"
    assert drift < naive, f"{name} drift {drift:.3f}% is not below naive's {naive:.3f}%"


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.integration
def test_each_baseline_still_learns_every_domain(report, name):
    L = report["methods"][name]["per_seed"]["0"]["loss_matrix"]
    for k in range(len(L) - 1):
        assert L[k + 1][k] < L[0][k], f"{name} did not learn domain {k}"
