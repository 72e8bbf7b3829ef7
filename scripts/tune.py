"""Hyperparameter trials on the validation split (carved from `spare`), never on the holdout.

    .venv/bin/python scripts/tune.py configs/tuning/crma.yaml [--out runs/tuning]

The grid file names a base run config, fixed overrides, and a grid of values; every point of
the grid is one protocol run with `corpus.split=validation` (the trial cannot see the
holdout). The trials and their scores are written to results/tuning/<name>.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import yaml

from crma.fileio import write_json, write_text
from crma.protocol import ProtocolRun, load_config


def trial_name(point: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


def score(report: dict) -> dict[str, dict[str, float]]:
    """Per method: drift, and the mean validation loss right after training each domain."""
    out = {}
    for label, m in report["methods"].items():
        runs = list(m["per_seed"].values())
        out[label] = {
            "drift": m["drift_mean"],
            "plasticity_loss": statistics.fmean(
                statistics.fmean(r["plasticity_loss"]) for r in runs
            ),
            "final_loss": statistics.fmean(statistics.fmean(r["loss_matrix"][-1]) for r in runs),
        }
    return out


def grid_points(spec: dict) -> list[dict]:
    """`grid: {key: [values]}` (every combination) or `points: [{key: value, ...}]` (as listed)."""
    if "points" in spec:
        return list(spec["points"])
    keys = list(spec["grid"])
    return [
        dict(zip(keys, values)) for values in itertools.product(*(spec["grid"][k] for k in keys))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "grid",
        type=Path,
        help="grid file: {config, set: {...}, grid: {key: [values]} or points: [...]}",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tuning"))
    args = parser.parse_args()
    spec = yaml.safe_load(args.grid.read_text())
    fixed = [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()] + [
        "corpus.split=validation"
    ]
    trials = []
    for point in grid_points(spec):
        overrides = fixed + [f"{k}={json.dumps(v)}" for k, v in point.items()]
        config = load_config(spec["config"], overrides)
        out = args.out / args.grid.stem / trial_name(point)
        finished = out / "report.json"  # a trial finished earlier is read back, not rerun
        report = (
            json.loads(finished.read_text())
            if finished.is_file()
            else ProtocolRun(config, out).run()
        )
        trials.append({"point": point, "scores": score(report), "run_dir": str(out)})
        print(f"trial {trial_name(point)}: {json.dumps(trials[-1]['scores'])}", flush=True)
    results = Path("results/tuning")
    write_json(
        results / f"{args.grid.stem}.json",
        {"grid_file": str(args.grid), "fixed": fixed, "trials": trials},
    )
    lines = [
        f"# Tuning trials: {args.grid.stem}",
        "",
        f"Grid file `{args.grid}`; every trial evaluates on the validation split (from `spare`).",
        "",
        "| trial | method | drift (%) | loss just after training (mean) | final loss (mean) |",
        "|---|---|---|---|---|",
    ]
    for t in trials:
        for label, s in t["scores"].items():
            lines.append(
                f"| {trial_name(t['point'])} | {label} | {s['drift']:+.3f} | {s['plasticity_loss']:.4f} | {s['final_loss']:.4f} |"
            )
    write_text(results / f"{args.grid.stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
