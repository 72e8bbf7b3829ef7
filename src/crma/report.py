"""Report of a protocol run: drift, learning advantage, plasticity, spectral log, plots.

Everything here is computed from the run directory's loss_matrix.json and metrics.jsonl files,
so `crma report DIR` regenerates report.json, report.md and plots/ at any time.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from crma.errors import UserError
from crma.fileio import atomic_path, write_json, write_text
from crma.provenance import describe_data, recorded_data

# -- the metrics of DESIGN §4 -----------------------------------------------------------------


def drift_per_domain(L: list[list[float]], domains: list[str]) -> dict[str, float]:
    """100·(L[T][i] − L[i+1][i]) / L[i+1][i] for every domain but the last (positive = forgetting)."""
    T = len(domains)
    return {domains[i]: 100 * (L[T][i] - L[i + 1][i]) / L[i + 1][i] for i in range(T - 1)}


def advantage(L: list[list[float]], L_ref: list[list[float]]) -> float:
    """100 · mean_i (L_ref[T][i] − L[T][i]) / L_ref[T][i] over the prior domains (positive: better)."""
    T = len(L) - 1
    return statistics.fmean(100 * (L_ref[T][i] - L[T][i]) / L_ref[T][i] for i in range(T - 1))


def plasticity(L: list[list[float]]) -> list[float]:
    """L[k][k−1]: the loss reached on each domain right after training it."""
    return [L[k][k - 1] for k in range(1, len(L))]


def learning(L: list[list[float | None]]) -> list[float | None]:
    """100·(L[i][i] − L[i+1][i]) / L[i][i]: how much domain i's own stage lowered its loss
    (None where L[i][i], a not-yet-trained domain's cell, was not evaluated)."""
    return [
        None if L[i][i] is None else 100 * (L[i][i] - L[i + 1][i]) / L[i][i]
        for i in range(len(L) - 1)
    ]


def mean_matrix(Ls: list[list[list[float | None]]]) -> list[list[float | None]]:
    """Cell-wise seed mean; a cell not evaluated (eval.future_domains: false) stays None."""
    return [
        [
            None if L0[k][i] is None else statistics.fmean(L[k][i] for L in Ls)
            for i in range(len(L0[k]))
        ]
        for L0 in Ls[:1]
        for k in range(len(L0))
    ]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "range": [min(values), max(values)],
        "values": values,
    }


# -- building the report -------------------------------------------------------------------------


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
        "comparisons": _comparisons(methods),
    }
    from crma.qa_eval import answer_report

    report.update(answer_report(run_dir, report))  # routing / QA sections, when evaluated
    write_json(run_dir / "report.json", report)
    write_outputs(run_dir, report)
    return report


def _comparisons(methods: dict[str, Any]) -> dict[str, Any]:
    """Every method against naive: are their per-seed drift ranges disjoint?"""
    if "naive" not in methods:
        return {}
    lo_n, hi_n = methods["naive"]["drift_range"]
    out = {}
    for label, m in methods.items():
        if label == "naive":
            continue
        lo, hi = m["drift_range"]
        out[f"{label}_vs_naive"] = {
            "drift_difference": m["drift_mean"] - methods["naive"]["drift_mean"],
            "ranges_disjoint": hi < lo_n or lo > hi_n,
        }
    return out


def write_outputs(run_dir: Path, report: dict[str, Any]) -> None:
    write_text(run_dir / "report.md", render_markdown(report))
    plot_all(run_dir, report)


# -- markdown ----------------------------------------------------------------------------------------


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
    from crma.qa_eval import answer_markdown

    out += answer_markdown(report)
    return "\n".join(out) + "\n"


# -- plots ----------------------------------------------------------------------------------------------


def plot_all(run_dir: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    domains, methods = report["domains"], report["methods"]

    # at most four panels a row, so a twelve-method comparison stays readable
    ncols = min(4, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, (label, m) in zip(axes.flat, methods.items()):
        Ls = [e["loss_matrix"] for e in m["per_seed"].values()]
        mean = [[float("nan") if v is None else v for v in row] for row in mean_matrix(Ls)]
        im = ax.imshow(mean, cmap="viridis", aspect="auto")  # not-evaluated cells stay blank
        ax.set_title(label)
        ax.set_xticks(range(len(domains)), [d[:4] for d in domains], fontsize=7)
        ax.set_yticks(range(len(domains) + 1), ["base"] + [d[:4] for d in domains], fontsize=7)
        ax.set_xlabel("evaluated domain")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for row in axes:
        row[0].set_ylabel("after stage")
    _save(fig, plots / "loss_matrix.png")

    prior = domains[:-1]
    fig, ax = plt.subplots(figsize=(min(16, 3 + len(prior) * (0.8 + 0.25 * len(methods))), 3.6))
    width = 0.8 / len(methods)
    # tab10 repeats after ten methods; tab20 keeps up to twenty apart
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    for j, (label, m) in enumerate(methods.items()):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(prior))]
        means = [m["drift_per_domain_mean"][d] for d in prior]
        ax.bar(xs, means, width, label=label, color=colors[j % len(colors)])
        for e in m["per_seed"].values():
            ax.scatter(xs, [e["drift_per_domain"][d] for d in prior], color="black", s=8, zorder=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(prior)), prior)
    ax.set_ylabel("drift (%)  (+ = forgetting)")
    ax.legend(fontsize=7, ncols=2 if len(methods) > 6 else 1)
    ax.set_title("Per-domain drift: bars = seed mean, dots = seeds")
    _save(fig, plots / "drift.png")

    traces = _traces(run_dir, methods)
    if traces["spectral"]:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for label, (xs, ys) in traces["spectral"].items():
            ax.plot(xs, [max(y, 1e-12) for y in ys], lw=0.8, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("global step (first seed)")
        ax.set_ylabel("max over layers abs(‖M‖₂ − 1)")
        ax.legend(fontsize=7)
        _save(fig, plots / "spectral_norm.png")
    if traces["grad"]:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        for label, (xs, raw, clipped) in traces["grad"].items():
            line = ax.plot(xs, raw, lw=0.6, alpha=0.5, label=f"{label} raw")[0]
            ax.plot(xs, clipped, lw=0.9, color=line.get_color(), label=f"{label} after ZClip")
        ax.set_yscale("log")
        ax.set_xlabel("global step (first seed)")
        ax.set_ylabel("gradient norm")
        ax.legend(fontsize=6, ncol=2)
        _save(fig, plots / "grad_norm.png")
    from crma.qa_eval import plot_answers

    plot_answers(run_dir, report)


def _traces(run_dir: Path, methods: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"spectral": {}, "grad": {}}
    for label, m in methods.items():
        seed = next(iter(m["per_seed"]))
        path = run_dir / label / f"seed-{seed}" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        xs = [r["global_step"] for r in rows]
        out["grad"][label] = (
            xs,
            [r["grad_norm"] for r in rows],
            [r["grad_norm_clipped"] for r in rows],
        )
        if rows and "spectral_norm_max" in rows[0]:
            out["spectral"][label] = (xs, [abs(r["spectral_norm_max"] - 1) for r in rows])
    return out


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
