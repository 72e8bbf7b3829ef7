"""report.json from a run directory's loss matrices, metrics logs, routing and QA files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from crma.errors import UserError
from crma.eval.sections import answer_report
from crma.fileio import write_json, write_text
from crma.provenance import recorded_data
from crma.report.markdown import render_markdown
from crma.report.metrics import (
    advantage,
    comparisons,
    drift_per_domain,
    learning,
    plasticity,
    summary,
)
from crma.report.plots import plot_all


def collect(run_dir: Path) -> tuple[list[str], list[int], dict[str, dict[int, list[list[float]]]]]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    labels = [m["label"] or m["name"] for m in config["methods"]]
    seeds = list(config["seeds"])
    matrices: dict[str, dict[int, list[list[float]]]] = {}
    domains: list[str] = []
    for label in labels:
        for seed in seeds:
            path = run_dir / label / f"seed-{seed}" / "loss_matrix.json"
            if not path.is_file():
                continue
            data = json.loads(path.read_text())
            domains = data["domains"]
            if len(data["loss_matrix"]) == len(domains) + 1:  # only complete runs are reported
                matrices.setdefault(label, {})[seed] = data["loss_matrix"]
    if not matrices:
        raise UserError(f"{run_dir}: no finished method/seed runs to report yet")
    return domains, seeds, matrices


def data_used(run_dir: Path) -> list[dict[str, Any]]:
    """The distinct data identities the reported units were computed on."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    found: list[dict[str, Any]] = []
    for label in (m["label"] or m["name"] for m in config["methods"]):
        for seed in config["seeds"]:
            unit = run_dir / label / f"seed-{seed}"
            if (unit / "loss_matrix.json").is_file():
                data = recorded_data(unit, embedded=not config.get("domains"))
                if (data := data or {"files": "not recorded"}) not in found:
                    found.append(data)
    return found


def spectral_log(metrics_path: Path) -> dict[str, Any] | None:
    worst = {"spectral_norm_dev_max": 0.0, "rowsum_err_max": 0.0, "colsum_err_max": 0.0, "steps": 0}
    if not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "spectral_norm_max" not in row:
            return None
        worst["steps"] += 1
        worst["spectral_norm_dev_max"] = max(
            worst["spectral_norm_dev_max"], abs(row["spectral_norm_max"] - 1)
        )
        worst["rowsum_err_max"] = max(worst["rowsum_err_max"], row["rowsum_err_max"])
        worst["colsum_err_max"] = max(worst["colsum_err_max"], row["colsum_err_max"])
    return worst if worst["steps"] else None


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Compute report.json from the run directory, then write report.md and plots/."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a crma run directory (no config.yaml)")
    domains, seeds, matrices = collect(run_dir)
    frozen = matrices.get("frozen", {})
    methods: dict[str, Any] = {}
    for label, per_seed_L in matrices.items():
        per_seed = {}
        for seed, L in per_seed_L.items():
            dpd = drift_per_domain(L, domains)
            entry: dict[str, Any] = {
                "loss_matrix": L,
                "drift_per_domain": dpd,
                "drift": statistics.fmean(dpd.values()),
                "plasticity_loss": plasticity(L),
                "learning_pct": learning(L),
                "spectral": spectral_log(run_dir / label / f"seed-{seed}" / "metrics.jsonl"),
            }
            if seed in frozen:
                entry["advantage_over_frozen"] = advantage(L, frozen[seed])
                entry["plasticity_vs_frozen_pct"] = statistics.fmean(
                    100 * (m - f) / f for m, f in zip(plasticity(L), plasticity(frozen[seed]))
                )
            per_seed[str(seed)] = entry
        drifts = [e["drift"] for e in per_seed.values()]
        s = summary(drifts)
        methods[label] = {
            "per_seed": per_seed,
            "drift_mean": s["mean"],
            "drift_sd": s["sd"],
            "drift_range": s["range"],
            "drift_per_domain_mean": {
                d: statistics.fmean(e["drift_per_domain"][d] for e in per_seed.values())
                for d in domains[:-1]
            },
            "drift_per_domain_sd": {
                d: (
                    statistics.stdev([e["drift_per_domain"][d] for e in per_seed.values()])
                    if len(per_seed) > 1
                    else None
                )
                for d in domains[:-1]
            },
        }
        for key in ("advantage_over_frozen", "plasticity_vs_frozen_pct"):
            values = [e[key] for e in per_seed.values() if key in e]
            if values:
                methods[label][key] = summary(values)
        spectral = [e["spectral"] for e in per_seed.values() if e["spectral"]]
        if spectral:
            methods[label]["spectral"] = {
                k: max(s_[k] for s_ in spectral)
                for k in ("spectral_norm_dev_max", "rowsum_err_max", "colsum_err_max")
            } | {"steps": sum(s_["steps"] for s_ in spectral)}
    report = {
        "domains": domains,
        "seeds": seeds,
        "data": data_used(run_dir),
        "methods": methods,
        "comparisons": comparisons(methods),
    }
    report.update(answer_report(run_dir, report))  # routing / QA sections, when evaluated
    write_json(run_dir / "report.json", report)
    write_outputs(run_dir, report)
    return report


def write_outputs(run_dir: Path, report: dict[str, Any]) -> None:
    write_text(run_dir / "report.md", render_markdown(report))
    plot_all(run_dir, report)
