"""The metrics of a loss matrix L (rows: after 0..T domains; columns: domains)."""

from __future__ import annotations

import statistics
from typing import Any


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


def comparisons(methods: dict[str, Any]) -> dict[str, Any]:
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
