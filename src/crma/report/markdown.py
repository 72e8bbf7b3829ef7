"""report.md: drift, learning, plasticity tables, then the routing and QA sections."""

from __future__ import annotations

import statistics
from typing import Any

from crma.eval.sections import answer_markdown
from crma.provenance import describe_data
from crma.report.metrics import mean_matrix


def plus_minus(mean: float | None, sd: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:+.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def drift_table(report: dict[str, Any]) -> str:
    """The seed-style table: per-domain drift, mean ± SD over seeds, per-seed values."""
    domains = report["domains"][:-1]
    head = "| method | " + " | ".join(domains) + " | drift mean ± SD | per seed | range |"
    lines = [head, "|" + "---|" * (len(domains) + 4)]
    for label, m in report["methods"].items():
        cells = [
            plus_minus(m["drift_per_domain_mean"][d], m["drift_per_domain_sd"][d]) for d in domains
        ]
        per_seed = ", ".join(f"{e['drift']:+.2f}" for e in m["per_seed"].values())
        lo, hi = m["drift_range"]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | **{plus_minus(m['drift_mean'], m['drift_sd'])}** | {per_seed} | [{lo:+.2f}, {hi:+.2f}] |"
        )
    return "\n".join(lines)


def learning_table(report: dict[str, Any]) -> list[str]:
    """Own-stage learning per domain (seed mean), where every L[i][i] was evaluated."""
    domains = report["domains"]
    rows = []
    for label, m in report["methods"].items():
        per_seed = [e.get("learning_pct") or [None] for e in m["per_seed"].values()]
        if any(v is None for values in per_seed for v in values):
            continue
        means = [statistics.fmean(values[i] for values in per_seed) for i in range(len(domains))]
        lowest = ", ".join(f"{min(values):.2f}" for values in per_seed)
        rows.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in means) + f" | {lowest} |")
    if not rows:
        return []
    return [
        "",
        "## Learning: how much each domain's own stage lowered its loss",
        "",
        "Learning (%) = 100·(L[i][i] − L[i+1][i]) / L[i][i], seed mean; the last column is the "
        "smallest over domains, per seed.",
        "",
        "| method | " + " | ".join(domains) + " | smallest, per seed |",
        "|" + "---|" * (len(domains) + 2),
        *rows,
    ]


def render_markdown(report: dict[str, Any]) -> str:
    domains, seeds = report["domains"], report["seeds"]
    out = [
        "# crma protocol report",
        "",
        f"Domains in training order: {', '.join(domains)}. Seeds: {', '.join(map(str, seeds))}.",
        f"Data: {describe_data(report['data'])}.",
        "Drift (%) = 100·(L[T][i] − L[i+1][i]) / L[i+1][i], held-out mean token loss; positive = forgetting; the last domain is excluded.",
        "",
        "## Drift",
        "",
        drift_table(report),
        "",
        "## Learning advantage over frozen and plasticity",
        "",
        "Advantage (%) = 100·mean_i (L_frozen[T][i] − L[T][i]) / L_frozen[T][i] over prior domains (positive: lower final loss than frozen).",
        "Plasticity = loss on each domain right after training it, L[k][k−1]; 'vs frozen' is the mean relative difference (positive: learns less than frozen).",
        "",
        "| method | advantage over frozen (%) | per seed | plasticity vs frozen (%) | just-trained loss per domain (seed mean) |",
        "|---|---|---|---|---|",
    ]
    for label, m in report["methods"].items():
        adv = m.get("advantage_over_frozen")
        pla = m.get("plasticity_vs_frozen_pct")
        mean_pl = [
            statistics.fmean(e["plasticity_loss"][k] for e in m["per_seed"].values())
            for k in range(len(domains))
        ]
        out.append(
            f"| {label} | {plus_minus(adv['mean'], adv['sd']) if adv else '–'} | "
            f"{', '.join(f'{v:+.2f}' for v in adv['values']) if adv else '–'} | "
            f"{plus_minus(pla['mean'], pla['sd']) if pla else '–'} | {', '.join(f'{v:.3f}' for v in mean_pl)} |"
        )
    out += learning_table(report)
    if report["comparisons"]:
        out += [
            "",
            "## Against naive",
            "",
            "| method | drift − naive drift (pp) | per-seed ranges disjoint |",
            "|---|---|---|",
        ]
        for key, c in report["comparisons"].items():
            out.append(
                f"| {key.removesuffix('_vs_naive')} | {c['drift_difference']:+.2f} | {'yes' if c['ranges_disjoint'] else 'no'} |"
            )
    spectral = {k: m["spectral"] for k, m in report["methods"].items() if "spectral" in m}
    if spectral:
        out += [
            "",
            "## Spectral log (CRMA mixing matrices, every logged step)",
            "",
            "| method | steps | max abs(‖M‖₂ − 1) | max abs(row sum − 1) | max abs(col sum − 1) |",
            "|---|---|---|---|---|",
        ]
        for label, s in spectral.items():
            out.append(
                f"| {label} | {s['steps']} | {s['spectral_norm_dev_max']:.1e} | {s['rowsum_err_max']:.1e} | {s['colsum_err_max']:.1e} |"
            )
    out += ["", "## Loss matrices (seed mean; row 0 = before training, row k = after stage k)", ""]
    for label, m in report["methods"].items():
        Ls = [e["loss_matrix"] for e in m["per_seed"].values()]
        out += [
            f"**{label}**",
            "",
            "| after | " + " | ".join(domains) + " |",
            "|" + "---|" * (len(domains) + 1),
        ]
        for k, row in enumerate(mean_matrix(Ls)):
            out.append(
                f"| {'base' if k == 0 else domains[k - 1]} | "
                + " | ".join("–" if v is None else f"{v:.4f}" for v in row)
                + " |"
            )
        out.append("")
    out += answer_markdown(report)
    return "\n".join(out) + "\n"


# -- plots ----------------------------------------------------------------------------------------------
