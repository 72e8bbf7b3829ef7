"""`crma report RUN --costs COSTS.json`: a protocol run's forgetting numbers beside each method's
costs, one table.

The cost columns come from `benchmarks/methods.py`'s JSON. A labelled variant with no options
of its own (crma-tied) takes the costs of the method it runs (crma); one with its own options
(osf-qv: OSF on q/v at a LoRA's budget) trains another number of parameters, so it has no cost
columns until the benchmark measures it. The time each method took per domain in the run itself
comes from its loss matrices (`train_seconds`, recorded by `crma run`): the benchmark's domains
are small, and EWC's Fisher and InfLoRA's input statistics grow with a domain's examples.

A table written over an earlier one keeps that one's rows whose numbers changed as the
report's history ("before"), with the settings that changed, so a rerun after a fix or a
new tuning budget shows what moved instead of erasing it.
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


def previous(out: Path) -> dict[str, Any] | None:
    """The head-to-head OUT holds now (report.json with its table, and config.yaml), or None.
    Read before `build_report` rewrites a run directory's report.json."""
    path = out / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON ({exc.msg}); delete it or write the table to another --out"
        ) from None
    if "head_to_head" not in report:
        return None
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return {"report": report, "config": config}


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; an empty mapping has no leaves (as if left out)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def setting_changes(then: dict[str, Any], now: dict[str, Any], *, shared_only: bool) -> list[str]:
    """ "key: old → new" per setting that differs ("–": not given). `shared_only`: only keys
    both name, for resolved configs, where a setting added since reads as its default in the
    older run; a method entry names only what its author set, so every key counts there."""
    a, b = _flat(then), _flat(now)
    keys = a.keys() & b.keys() if shared_only else a.keys() | b.keys()
    show = {
        k: (json.dumps(a[k]) if k in a else "–", json.dumps(b[k]) if k in b else "–") for k in keys
    }
    return [f"{k}: {old} → {new}" for k, (old, new) in sorted(show.items()) if old != new]


def _by_label(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m.get("label") or m["name"]: m for m in config.get("methods") or []}


NUMBERS = ("drift_mean", "drift_sd", "plasticity_vs_frozen_pct", "advantage_over_frozen")


def _numbers(row: dict[str, Any]) -> tuple:
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in NUMBERS)


def _after(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers a history row is shown beside: the row that replaced it (None: dropped)."""
    return {k: row.get(k) for k in NUMBERS} if row else None


def _with_successors(entries: list[dict], table: list[dict]) -> list[dict]:
    """Earlier entries, each row with the row that replaced it (`after`). Entries written
    before `after` was stored get it rebuilt: the table an entry was replaced by is `table`
    (the one now being replaced) under the `then` rows of every newer entry."""
    state = {r["method"]: r for r in table}
    out = []
    for entry in entries:  # newest first
        rows = [
            r if "after" in r else r | {"after": _after(state.get(r["method"]))}
            for r in entry["rows"]
        ]
        state |= {r["method"]: r for r in entry["rows"]}
        out.append(entry | {"rows": rows})
    return out


def history(
    before: dict[str, Any] | None,
    report: dict[str, Any],
    config: dict[str, Any],
    table: list[dict],
    note: str | None,
) -> list[dict[str, Any]]:
    """The history the new table carries, newest first: the earlier table's entries, and,
    when some of its rows' numbers differ from (or are missing in) the new table, those rows
    as a new entry with the data and settings that changed."""
    if before is None:
        return []
    earlier = _with_successors(
        before["report"].get("history") or [], before["report"]["head_to_head"]
    )
    now = {r["method"]: r for r in table}
    replaced = [
        r
        for r in before["report"]["head_to_head"]
        if _numbers(r) != _numbers(now.get(r["method"], {}))
    ]
    if not replaced:
        return earlier
    old_config = before["config"]
    old_methods, new_methods = _by_label(old_config), _by_label(config)
    shared = setting_changes(
        {k: v for k, v in old_config.items() if k != "methods"},
        {k: v for k, v in config.items() if k != "methods"},
        shared_only=True,
    )
    for r in replaced:
        label = r["method"]
        r["after"] = _after(now.get(label))
        r["settings_changed"] = (
            setting_changes(old_methods[label], new_methods[label], shared_only=False)
            if label in old_methods and label in new_methods
            else ["not in the new run"]
        )
    entry = {
        "note": note,
        "data": {"then": before["report"].get("data"), "now": report.get("data")},
        "settings_changed": shared,
        "rows": replaced,
    }
    return [entry, *earlier]


def _then_after(then: dict | None, after: dict | None) -> str:
    return f"{_pm(then)} → {_pm(after)}"


def history_markdown(entries: list[dict[str, Any]]) -> str:
    """## Before: each replaced table's rows beside the rows that replaced them, newest first."""
    lines = [
        "## Before",
        "",
        "Rows of earlier head-to-head tables whose numbers changed when the table was written "
        "again (newest first), each beside the row that replaced it then (then → after). "
        "Settings changed: between those two tables, those both configs name; code changes "
        "are in the note.",
    ]
    for i, e in enumerate(entries, 1):
        data = e["data"]
        lines += ["", f"### {i}. {e['note'] or 'an earlier table'}", ""]
        if data["then"] != data["now"]:
            lines.append(f"Data: {json.dumps(data['then'])} → {json.dumps(data['now'])}.")
        if e["settings_changed"]:
            lines.append("Shared settings: " + "; ".join(e["settings_changed"]) + ".")
        lines += [
            "",
            "| method | drift | plasticity | advantage | settings changed |",
            "|---|---|---|---|---|",
        ]
        for r in e["rows"]:
            after = r["after"] or {}
            drift = _then_after(
                {"mean": r["drift_mean"], "sd": r["drift_sd"]},
                {"mean": after["drift_mean"], "sd": after["drift_sd"]} if after else None,
            )
            cells = [
                drift,
                _then_after(
                    r.get("plasticity_vs_frozen_pct"), after.get("plasticity_vs_frozen_pct")
                ),
                _then_after(r.get("advantage_over_frozen"), after.get("advantage_over_frozen")),
                "; ".join(r["settings_changed"]) or "none",
            ]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_head_to_head(
    run_dir: Path,
    report: dict[str, Any],
    costs_file: Path,
    out: Path,
    before: dict[str, Any] | None = None,
    note: str | None = None,
) -> None:
    """OUT/report.json (the run's report plus a `head_to_head` section and its `history`) and
    OUT/report.md (the table first, then what it replaced, then the run's report); with OUT
    elsewhere, also its config.yaml and plots/. `before`: OUT's table as `previous` read it;
    `note` names it in the history."""
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
    past = history(before, report, config, table, note)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "report.json", {**report, "head_to_head": table, "costs": source, "history": past}
    )
    text = ["# Head to head", "", source, "", markdown(table), ""]
    text += [history_markdown(past), ""] if past else []
    text.append(render_markdown(report))
    write_text(out / "report.md", "\n".join(text))
    if out.resolve() != run_dir.resolve():
        shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
        if (run_dir / "plots").is_dir():
            with atomic_path(out / "plots") as tmp:
                shutil.copytree(run_dir / "plots", tmp)
