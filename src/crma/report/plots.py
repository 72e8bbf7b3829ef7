"""plots/: loss matrices, drift per domain, training traces, routing confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crma.eval.sections import plot_answers
from crma.fileio import atomic_path
from crma.report.metrics import mean_matrix


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
    _tradeoff(plt, plots / "tradeoff.png", methods, colors)

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
    plot_answers(run_dir, report)


def _tradeoff(plt: Any, path: Path, methods: dict[str, Any], colors: Any) -> None:
    """Drift against advantage over frozen, one point per seed and a labelled mean per method:
    forgetting and learning in one picture (only when the run has frozen to compare with)."""
    compared = {k: m for k, m in methods.items() if "advantage_over_frozen" in m}
    if not compared:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for j, (label, m) in enumerate(compared.items()):
        color = colors[j % len(colors)]
        seeds = m["per_seed"].values()
        ax.scatter(
            [e["drift"] for e in seeds],
            [e["advantage_over_frozen"] for e in seeds],
            color=color,
            s=12,
            alpha=0.6,
        )
        x, y = m["drift_mean"], m["advantage_over_frozen"]["mean"]
        ax.scatter([x], [y], color=color, s=60, edgecolors="black", zorder=3, label=label)
        ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")  # the 0.5 % drift target
    ax.set_xlabel("drift (%)  (+ = forgetting; dashed: the 0.5 % target)")
    ax.set_ylabel("advantage over frozen (%)  (+ = lower final loss)")
    ax.set_title("Forgetting against learning: large = seed mean, small = seeds")
    ax.legend(fontsize=7, ncols=2 if len(compared) > 6 else 1)
    _save(fig, path)


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
