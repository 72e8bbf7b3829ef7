"""The routing and QA sections of a protocol report, built from each unit's routing.json and
qa.json: summaries pooled over seeds, paired differences, markdown lines and plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from crma.eval.qa import KINDS, markdown_table
from crma.eval.stats import paired_difference, wilson_interval
from crma.fileio import atomic_path
from crma.routing.metrics import plot_confusion
from crma.routing.router import ROUTERS


def answer_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """`routing` and `qa` sections of report.json from the runs' routing.json / qa.json files."""
    domains, out = report["domains"], {}
    routing, qa, qa_runs = {}, {}, {}
    for label, m in report["methods"].items():
        per_seed = {s: run_dir / label / f"seed-{s}" for s in m["per_seed"]}
        r = {
            s: json.loads((p / "routing.json").read_text())
            for s, p in per_seed.items()
            if (p / "routing.json").is_file()
        }
        if r:
            routing[label] = _routing_summary(r, m, domains)
        q = {
            s: json.loads((p / "qa.json").read_text())
            for s, p in per_seed.items()
            if (p / "qa.json").is_file()
        }
        if q:
            qa[label], qa_runs[label] = _qa_summary(q), q
    if routing:
        out["routing"] = routing
    if qa:
        out["qa"] = qa
        paired = _qa_paired(qa_runs)
        if paired:
            out["qa_paired"] = paired
    return out


QA_REFERENCES = ("frozen", "naive")  # the QA targets compare against these
MARGIN = 0.01  # the QA target: a method as deployed within 1 point of frozen routed, or better


def verdict(difference: dict[str, Any], margin: float = MARGIN) -> str:
    """`met` when the whole 95% interval of (method − reference) lies above −margin, `missed`
    when it lies below, else `undecided` (too few discordant items to tell)."""
    lo, hi = difference["ci95"]
    return "met" if lo >= -margin else "missed" if hi < -margin else "undecided"


def _qa_paired(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method minus frozen and naive on the same QA items (seeds pooled), each side as
    deployed: routed where the method needs a task id, else its one model (oracle).

    runs: method label -> seed -> that unit's qa.json.
    """

    def deployed(method: dict[str, Any]) -> str:
        return "routed" if "routed" in next(iter(method.values()))["conditions"] else "oracle"

    def hits(
        method: dict[str, Any], seeds: list[str], d: str, kind: str, condition: str | None = None
    ) -> str | None:
        condition = condition or deployed(method)
        cells = [method[s]["results"][condition][d].get(kind) for s in seeds]
        return "".join(c["hits"] for c in cells) if all(c and "hits" in c for c in cells) else None

    out, done = [], set()
    for ref in (r for r in QA_REFERENCES if r in runs):
        for label, mine in runs.items():
            seeds = sorted(set(mine) & set(runs[ref]))
            if label == ref or not seeds or (ref, label) in done:
                continue  # frozen − naive is shown, naive − frozen would only flip its sign
            done.add((label, ref))
            cells: dict[str, Any] = {}
            for d in mine[seeds[0]]["domains"]:
                for kind in KINDS:
                    a, b = hits(mine, seeds, d, kind), hits(runs[ref], seeds, d, kind)
                    if a and b:
                        cells.setdefault(d, {})[kind] = paired_difference(a, b)
            if cells:
                conditions = [deployed(mine), deployed(runs[ref])]
                out.append(
                    {
                        "method": label,
                        "minus": ref,
                        "conditions": conditions,
                        "seeds": seeds,
                        "results": cells,
                    }
                )
    for label, mine in runs.items():  # the on/off ablation: the same weights, backbone off
        seeds = sorted(mine)
        if "backbone_off" not in mine[seeds[0]]["conditions"]:
            continue
        cells = {}
        for d in mine[seeds[0]]["domains"]:
            for kind in KINDS:
                a = hits(mine, seeds, d, kind, "oracle")
                b = hits(mine, seeds, d, kind, "backbone_off")
                if a and b:
                    cells.setdefault(d, {})[kind] = paired_difference(a, b)
        if cells:
            out.append(
                {
                    "method": label,
                    "minus": f"{label} backbone off",
                    "conditions": ["oracle", "backbone_off"],
                    "seeds": seeds,
                    "results": cells,
                }
            )
    return out


def _routing_summary(per_seed: dict[str, Any], m: dict[str, Any], domains: list[str]) -> dict:
    routers = [k for k in ROUTERS if any(k in r for r in per_seed.values())]
    out = {}
    for kind in routers:
        runs = {s: r[kind] for s, r in per_seed.items() if kind in r}
        drift_routed = {}
        for s, r in runs.items():
            L = m["per_seed"][s]["loss_matrix"]
            drift_routed[s] = (
                statistics.fmean(
                    100 * (r["routed_final_loss"][d] - L[i + 1][i]) / L[i + 1][i]
                    for i, d in enumerate(domains[:-1])
                )
                if len(domains) > 1
                else 0.0
            )
        first = next(iter(runs.values()))
        confusion = [
            [sum(r["confusion"][i][j] for r in runs.values()) for j in range(len(first["labels"]))]
            for i in range(len(first["domains"]))
        ]
        out[kind] = {
            "top1": {
                d: statistics.fmean(r["top1"][d] for r in runs.values()) for d in first["domains"]
            },
            "labels": first["labels"],
            "domains": first["domains"],
            "confusion": confusion,
            "drift_routed_mean": statistics.fmean(drift_routed.values()),
            "drift_oracle_mean": statistics.fmean(m["per_seed"][s]["drift"] for s in runs),
            "drift_routed_per_seed": drift_routed,
        }
    return out


def _qa_summary(per_seed: dict[str, Any]) -> dict[str, Any]:
    """Counts pooled over seeds per condition, domain and kind, with Wilson intervals."""
    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {
        "domains": first["domains"],
        "conditions": first["conditions"],
        "seeds": list(per_seed),
        "results": {},
    }
    for c in first["conditions"]:
        for d in first["domains"]:
            for kind in first["results"][c].get(d, {}):
                cells = [q["results"][c][d][kind] for q in per_seed.values()]
                correct, total = sum(x["correct"] for x in cells), sum(x["total"] for x in cells)
                lo, hi = wilson_interval(correct, total)
                out["results"].setdefault(c, {}).setdefault(d, {})[kind] = {
                    "correct": correct,
                    "total": total,
                    "accuracy": correct / max(1, total),
                    "ci95": [lo, hi],
                }
    routed = [q["routing_of_items"] for q in per_seed.values() if q.get("routing_of_items")]
    for d, kinds in (routed[0] if routed else {}).items():
        for kind in kinds:  # each seed routes the same items: the mean of the shares
            share = statistics.fmean(r[d][kind]["to_own_domain"] for r in routed)
            out.setdefault("to_own_domain", {}).setdefault(d, {})[kind] = share
    return out


def answer_markdown(report: dict[str, Any]) -> list[str]:
    """report.md lines for the routing and QA sections (nothing when absent)."""
    out: list[str] = []
    if report.get("routing"):
        out += [
            "",
            "## Routing (holdout top-1 per domain; drift under routed vs oracle choice)",
            "",
            "| method | router | "
            + " | ".join(report["domains"])
            + " | drift routed | drift oracle |",
            "|" + "---|" * (len(report["domains"]) + 4),
        ]
        for label, routers in report["routing"].items():
            for kind, r in routers.items():
                cells = [f"{100 * r['top1'].get(d, 0):.1f}" for d in report["domains"]]
                out.append(
                    f"| {label} | {kind} | "
                    + " | ".join(cells)
                    + f" | {r['drift_routed_mean']:+.2f} | {r['drift_oracle_mean']:+.2f} |"
                )
    if report.get("qa"):
        out += ["", "## QA accuracy (%) [Wilson 95%], counts pooled over seeds", ""]
        for label, q in report["qa"].items():
            out += [f"**{label}**", "", markdown_table(q), ""]
        out += _routed_items_lines(report)
    if report.get("qa_paired"):
        out += [
            "## QA paired differences (points, 95% interval on the same items)",
            "",
            "| method | minus | conditions | "
            + " | ".join(f"{d} {k}" for d in report["domains"] for k in KINDS)
            + " |",
            "|" + "---|" * (3 + len(report["domains"]) * len(KINDS)),
        ]
        for p in report["qa_paired"]:
            cells = []
            for d in report["domains"]:
                for k in KINDS:
                    r = p["results"].get(d, {}).get(k)
                    cells.append("–" if r is None else _paired_cell(r))
            versus = " − ".join(p["conditions"])
            out.append(f"| {p['method']} | {p['minus']} | {versus} | " + " | ".join(cells) + " |")
        out += _target_lines(report)
    return out


def _routed_items_lines(report: dict[str, Any]) -> list[str]:
    """How the router sends the QA prompts themselves: the share routed to their own domain."""
    rows = {m: q["to_own_domain"] for m, q in report["qa"].items() if q.get("to_own_domain")}
    if not rows:
        return []
    out = [
        "**QA prompts routed to their own domain (%)**, the router of the routed condition",
        "",
        "| method | " + " | ".join(f"{d} {k}" for d in report["domains"] for k in KINDS) + " |",
        "|" + "---|" * (1 + len(report["domains"]) * len(KINDS)),
    ]
    for label, shares in rows.items():
        cells = [
            "–" if (v := shares.get(d, {}).get(k)) is None else f"{100 * v:.1f}"
            for d in report["domains"]
            for k in KINDS
        ]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out + [""]


def _target_lines(report: dict[str, Any]) -> list[str]:
    """Which domains decide "method ≥ frozen − 1 point" (as deployed), and which way."""
    rows = [p for p in report["qa_paired"] if p["minus"] == "frozen"]
    if not rows:
        return []
    out = [
        "",
        f"**Target: as deployed ≥ frozen routed − {100 * MARGIN:g} point** (met: the whole "
        "interval above the margin; missed: below it; undecided: the interval spans it)",
        "",
        "| method | " + " | ".join(f"{d} {k}" for d in report["domains"] for k in KINDS) + " |",
        "|" + "---|" * (1 + len(report["domains"]) * len(KINDS)),
    ]
    for p in rows:
        cells = [
            verdict(r) if (r := p["results"].get(d, {}).get(k)) else "–"
            for d in report["domains"]
            for k in KINDS
        ]
        out.append(f"| {p['method']} | " + " | ".join(cells) + " |")
    return out


def _paired_cell(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def plot_answers(run_dir: Path, report: dict[str, Any]) -> None:
    """plots/routing_<method>_<router>.png: confusion matrices summed over seeds;
    plots/qa_paired.png: the paired QA differences with their intervals."""
    if report.get("qa_paired"):
        plot_paired(report["qa_paired"], report["domains"], run_dir / "plots" / "qa_paired.png")
    for label, routers in report.get("routing", {}).items():
        for kind, r in routers.items():
            metrics = {**r, "router": kind}
            plot_confusion(
                metrics,
                run_dir / "plots" / f"routing_{label}_{kind}.png",
                f"{label}: router {kind} (holdouts, all seeds)",
            )


def plot_paired(pairs: list[dict[str, Any]], domains: list[str], path: Path) -> None:
    """One panel per pair: the difference in points per domain and item kind, its 95 % interval,
    and against frozen the target's margin (−1 point) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(d, k) for d in domains for k in KINDS]
    fig, axes = plt.subplots(
        1, len(pairs), figsize=(3.2 * len(pairs) + 1, 0.28 * len(rows) + 1.4), sharey=True
    )
    for ax, pair in zip([axes] if len(pairs) == 1 else axes, pairs):
        for y, (d, k) in enumerate(rows):
            if r := pair["results"].get(d, {}).get(k):
                lo, hi = (100 * v for v in r["ci95"])
                ax.plot([lo, hi], [y, y], color="tab:blue", lw=2)
                ax.plot(100 * r["difference"], y, "o", color="tab:blue", ms=4)
        ax.axvline(0, color="grey", lw=0.8)
        if pair["minus"] == "frozen":  # the target's margin
            ax.axvline(-100 * MARGIN, color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{pair['method']} − {pair['minus']}", fontsize=8)
        ax.set_xlabel("points (95 % interval)", fontsize=7)
        ax.tick_params(labelsize=7)
    first = axes if len(pairs) == 1 else axes[0]
    first.set_yticks(range(len(rows)), [f"{d} {k}" for d, k in rows])
    first.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
