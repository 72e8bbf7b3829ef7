"""Hyperparameter trials on the validation split (carved from `spare`), never on the holdout.

    .venv/bin/python scripts/tune.py configs/tuning/paper-lr.yaml [--out runs/tuning]

The grid file names a base run config, fixed overrides, and a grid of values (or a list of
points); every point is one protocol run with `corpus.split=validation` (the trial cannot see
the holdout). Each method's setting is then chosen by one rule (see `select`). Trials, scores
and choices go to results/tuning/<name>.md and .json; a finished trial is read back, not rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from crma.fileio import write_json, write_text
from crma.protocol import ProtocolRun, load_config


def trial_name(point: dict) -> str:
    """`trial:` if the point names itself (e.g. when it sets a whole method), else key=value,...
    over its settings (a `methods:` list, choosing who runs, is not part of the name)."""
    if "trial" in point:
        return point["trial"]
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items() if k != "methods")


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


MAX_DRIFT = 0.5  # forgetting bound of the selection rule, in % (the paper's target size)


def select(trials: list[dict]) -> dict[str, str]:
    """One rule for every method, ours included: the lowest final validation loss among the
    trials that forget at most MAX_DRIFT (drift <= 0.5 %; negative drift, earlier domains
    getting better, is not forgetting); if none forgets that little, the least drift."""
    chosen = {}
    labels = dict.fromkeys(label for t in trials for label in t["scores"])
    for label in labels:  # a trial may run only some of the methods
        runs = [
            (trial_name(t["point"]), t["scores"][label]) for t in trials if label in t["scores"]
        ]
        stable = [r for r in runs if r[1]["drift"] <= MAX_DRIFT]
        best = (
            min(stable, key=lambda r: r[1]["final_loss"])
            if stable
            else min(runs, key=lambda r: r[1]["drift"])
        )
        chosen[label] = best[0]
    return chosen


def earlier_trials(root: Path) -> list[Path]:
    """Trial run directories of every grid: a (method, seed) run with identical settings is
    copied from them rather than trained again."""
    return sorted(p.parent for p in root.glob("*/*/config.yaml"))


def grid_points(spec: dict) -> list[dict]:
    """`grid: {key: [values]}` (every combination) or `points: [{key: value, ...}]` (as listed)."""
    if "points" in spec:
        return list(spec["points"])
    keys = list(spec["grid"])
    return [
        dict(zip(keys, values)) for values in itertools.product(*(spec["grid"][k] for k in keys))
    ]


def fixed(spec: dict) -> list[str]:
    """Overrides shared by every trial; the split is always validation."""
    shared = [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()]
    return shared + ["corpus.split=validation"]


def trial_configs(spec: dict) -> list[tuple[dict, Any]]:
    """(point, resolved run config) per trial; a bad key or option fails here, before any run."""
    out = []
    for point in grid_points(spec):
        own = [f"{k}={json.dumps(v)}" for k, v in point.items() if k != "trial"]
        out.append((point, load_config(spec["config"], fixed(spec) + own)))
    return out


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
    trials = []
    for point, config in trial_configs(spec):
        out = args.out / args.grid.stem / trial_name(point)
        finished = out / "report.json"  # a trial finished earlier is read back, not rerun
        report = (
            json.loads(finished.read_text())
            if finished.is_file()
            else ProtocolRun(config, out, reuse=earlier_trials(args.out)).run()
        )
        trials.append({"point": point, "scores": score(report), "run_dir": str(out)})
        print(f"trial {trial_name(point)}: {json.dumps(trials[-1]['scores'])}", flush=True)
    results = Path("results/tuning")
    chosen = select(trials)
    write_json(
        results / f"{args.grid.stem}.json",
        {"grid_file": str(args.grid), "fixed": fixed(spec), "trials": trials, "selected": chosen},
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
    lines += [
        "",
        f"Selected (lowest final loss among drift <= {MAX_DRIFT} %, else least drift):",
        "",
        *(f"- {label}: {name}" for label, name in chosen.items()),
    ]
    write_text(results / f"{args.grid.stem}.md", "\n".join(lines) + "\n")
    print("selected: " + json.dumps(chosen), flush=True)


if __name__ == "__main__":
    main()
