"""The head-to-head table of issue 5: a protocol run's forgetting numbers beside each method's costs.

    .venv/bin/python scripts/head_to_head.py runs/baselines \
        --costs results/benchmarks/methods.json --out results/baselines \
        [--logs results/baselines/runs/logs/*.log]

Reads the run's loss matrices (through `crma.report.build.build_report`, so the run's own report.md,
report.json and plots are refreshed too) and the cost columns measured by
`benchmarks/methods.py`, and writes OUT/report.json (the run's report plus a `head_to_head`
section), OUT/report.md (the table first, then the run's report), OUT/config.yaml and
OUT/plots/. A labelled variant with no options of its own (crma-tied) takes the costs of the
method it runs (crma); one with its own options (osf-qv: OSF on q/v at a LoRA's budget) trains
another number of parameters, so it has no cost columns until the benchmark measures it.
`--logs` adds the time each method took per domain in the run itself, read from what
`crma run` printed ("[label seed N] k/K domain: S steps in X s"): the benchmark's domains are
small, and EWC's Fisher and InfLoRA's input statistics grow with a domain's examples.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from crma.errors import UserError
from crma.fileio import atomic_path, write_json, write_text
from crma.report.build import build_report
from crma.report.markdown import plus_minus, render_markdown

COLUMNS = {
    "drift": "mean ± SD over seeds of the drift (%), positive = forgetting",
    "range": "lowest and highest per-seed drift (%)",
    "plasticity": "loss just after training each domain, relative to frozen (%; positive = learns less)",
    "advantage": "final loss on earlier domains below frozen's (%; positive = better)",
    "+trainable": "trainable parameters beyond naive's LoRA",
    "extra memory": "bytes kept beyond the adapters and the base (state + copies + backbone)",
    "step x": "optimizer-step time relative to naive, measured side by side",
    "domain x": "time to add one domain relative to naive (includes Fisher, SVD, ...), in the "
    "benchmark; EWC's and InfLoRA's end-of-domain work grows with the domain's examples",
    "task id": "inference must be told (or route to) the domain",
}
RUN_TIME = (
    "train s/domain",
    "median wall seconds to train one domain in this run, end-of-domain work included "
    "(crma run's log; one process per core); in brackets, relative to naive",
)
TRAINED = re.compile(r"^\[(\S+) seed (\d+)\] \d+/\d+ (\S+): \d+ steps in (\d+) s,")


def train_seconds(logs: list[Path]) -> dict[str, float]:
    """Median training seconds per domain for each label, from `crma run` logs.

    A domain that was already trained when a run resumed prints 0 s and is left out; a
    (label, seed, domain) printed twice keeps its last time.
    """
    times: dict[tuple[str, str, str], int] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if m := TRAINED.match(line):
                times[m.group(1, 2, 3)] = int(m.group(4))
    per_label: dict[str, list[int]] = {}
    for (label, _, _), seconds in times.items():
        if seconds > 0:
            per_label.setdefault(label, []).append(seconds)
    return {label: statistics.median(v) for label, v in per_label.items()}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pm(summary: dict[str, Any] | None) -> str:
    return plus_minus(summary["mean"], summary.get("sd")) if summary else "–"


def rows(report: dict[str, Any], costs: dict[str, Any], names: dict[str, str]) -> list[dict]:
    """One row per reported method; cost fields are None where the benchmark lacks the method."""
    out = []
    for label, m in report["methods"].items():
        cost = costs.get(label) or costs.get(names.get(label, label))
        out.append(
            {
                "method": label,
                "drift_mean": m["drift_mean"],
                "drift_sd": m["drift_sd"],
                "drift_range": m["drift_range"],
                "seeds": len(m["per_seed"]),
                "plasticity_vs_frozen_pct": m.get("plasticity_vs_frozen_pct"),
                "advantage_over_frozen": m.get("advantage_over_frozen"),
                **{
                    k: cost[k] if cost else None
                    for k in ("extra_trainable", "extra_memory", "step_x", "domain_x")
                },
                "needs_task_id": cost["needs_task_id"] if cost else None,
            }
        )
    return out


def _run_time(r: dict, naive: float | None) -> str:
    s = r.get("train_s_per_domain")
    if s is None:
        return "–"
    return f"{s:.0f} ({s / naive:.1f}×)" if naive else f"{s:.0f}"


def markdown(table: list[dict]) -> str:
    columns = dict(COLUMNS)
    if any("train_s_per_domain" in r for r in table):
        columns[RUN_TIME[0]] = RUN_TIME[1]
    naive = next((r.get("train_s_per_domain") for r in table if r["method"] == "naive"), None)
    head = "| method | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for r in table:
        drift = _pm({"mean": r["drift_mean"], "sd": r["drift_sd"]})
        lo, hi = r["drift_range"]
        known = r["step_x"] is not None
        cells = [
            drift,
            f"[{lo:+.2f}, {hi:+.2f}]",
            _pm(r["plasticity_vs_frozen_pct"]),
            _pm(r["advantage_over_frozen"]),
            f"{r['extra_trainable']:+,}" if known else "–",
            _size(r["extra_memory"]) if known else "–",
            f"{r['step_x']:.2f}" if known else "–",
            f"{r['domain_x']:.2f}" if known else "–",
            ("yes" if r["needs_task_id"] else "no") if known else "–",
        ]
        if RUN_TIME[0] in columns:
            cells.append(_run_time(r, naive))
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    notes = [f"- **{k}**: {v}" for k, v in columns.items()]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a `crma run` output folder")
    parser.add_argument("--costs", type=Path, required=True, help="benchmarks/methods.py JSON")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md/json")
    parser.add_argument(
        "--logs", type=Path, nargs="+", default=[], help="what `crma run` printed, for run times"
    )
    args = parser.parse_args(argv)
    if not args.costs.is_file():
        raise UserError(f"{args.costs}: no such cost file; run benchmarks/methods.py first")
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)}: no such log; pass what `crma run` printed")
    costs = json.loads(args.costs.read_text())
    report = build_report(args.run)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    names = {m["label"] or m["name"]: m["name"] for m in config["methods"] if not m.get("options")}
    table = rows(report, costs["methods"], names)
    if args.logs:
        seconds = train_seconds(args.logs)
        for r in table:
            r["train_s_per_domain"] = seconds.get(r["method"])
    s = costs["settings"]
    source = (
        f"Costs: `{args.costs}` (benchmarks/methods.py: {s['rounds']} rounds × {s['steps']} "
        f"steps, batch {s['batch_size']} × {s['max_length']} tokens, {s['examples']} examples "
        f"per domain, {s['threads']} threads)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "report.json", {**report, "head_to_head": table, "costs": source})
    text = ["# Head to head", "", source, "", markdown(table), "", render_markdown(report)]
    write_text(args.out / "report.md", "\n".join(text))
    shutil.copyfile(args.run / "config.yaml", args.out / "config.yaml")
    if (args.run / "plots").is_dir():
        with atomic_path(args.out / "plots") as tmp:
            shutil.copytree(args.run / "plots", tmp)
    print(f"wrote {args.out / 'report.md'}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"head_to_head: error: {exc}", file=sys.stderr)
        sys.exit(2)
