"""`crma report RUN --costs COSTS.json`: a protocol run's forgetting numbers beside each method's
costs, one table.

The cost columns come from `benchmarks/methods.py`'s JSON. A labelled variant with no options
of its own (crma-tied) takes the costs of the method it runs (crma); one with its own options
(osf-qv: OSF on q/v at a LoRA's budget) trains another number of parameters, so it has no cost
columns until the benchmark measures it. The time each method took per domain in the run itself
comes from its loss matrices (`train_seconds`, recorded by `crma run`): the benchmark's domains
are small, and EWC's Fisher and InfLoRA's input statistics grow with a domain's examples.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

from crma.errors import UserError
from crma.fileio import atomic_path, write_json, write_text
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
    "(crma run records it in each loss matrix; one process per core); in brackets, relative "
    "to naive",
)


def train_seconds(run_dir: Path, report: dict[str, Any]) -> dict[str, float]:
    """Median wall seconds to train one domain, per reported method, over its seeds and domains
    (`train_seconds` of each loss matrix; domains an earlier, killed process trained are None
    there and left out)."""
    out = {}
    for label, m in report["methods"].items():
        times = []
        for seed in m["per_seed"]:
            unit = json.loads((run_dir / label / f"seed-{seed}" / "loss_matrix.json").read_text())
            times += [s for s in unit.get("train_seconds") or [] if s]
        if times:
            out[label] = statistics.median(times)
    return out


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


def load_costs(path: Path) -> dict[str, Any]:
    """benchmarks/methods.py's JSON: {settings, methods: {name: costs}}."""
    if not path.is_file():
        raise UserError(f"{path}: no such cost file; run benchmarks/methods.py first")
    try:
        costs = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc.msg})") from None
    if not isinstance(costs, dict) or not {"settings", "methods"} <= costs.keys():
        raise UserError(f"{path}: expected benchmarks/methods.py's JSON (settings, methods)")
    return costs


def write_head_to_head(run_dir: Path, report: dict[str, Any], costs_file: Path, out: Path) -> None:
    """OUT/report.json (the run's report plus a `head_to_head` section) and OUT/report.md (the
    table first, then the run's report); with OUT elsewhere, also its config.yaml and plots/."""
    costs = load_costs(costs_file)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    names = {m["label"] or m["name"]: m["name"] for m in config["methods"] if not m.get("options")}
    table = rows(report, costs["methods"], names)
    seconds = train_seconds(run_dir, report)
    if seconds:
        for r in table:
            r["train_s_per_domain"] = seconds.get(r["method"])
    s = costs["settings"]
    source = (
        f"Costs: `{costs_file}` (benchmarks/methods.py: {s['rounds']} rounds × {s['steps']} "
        f"steps, batch {s['batch_size']} × {s['max_length']} tokens, {s['examples']} examples "
        f"per domain, {s['threads']} threads)."
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", {**report, "head_to_head": table, "costs": source})
    text = ["# Head to head", "", source, "", markdown(table), "", render_markdown(report)]
    write_text(out / "report.md", "\n".join(text))
    if out.resolve() != run_dir.resolve():
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
        if (run_dir / "plots").is_dir():
            with atomic_path(out / "plots") as tmp:
                shutil.copytree(run_dir / "plots", tmp)
