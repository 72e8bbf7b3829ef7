"""Intervals for accuracies: Wilson for one proportion, Agresti–Min for a paired difference."""

from __future__ import annotations

import math
from typing import Any


def accuracy(items: list[dict[str, Any]], predictions: list[int]) -> float:
    correct = sum(p == item["answer"] for item, p in zip(items, predictions))
    return correct / len(items) if items else 0.0


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest even near 0% or 100%."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: str, b: str, z: float = 1.96) -> dict[str, float | int | list[float]]:
    """Accuracy of `a` minus `b` on the same items, with a 95% interval for matched pairs
    (far narrower than two separate intervals when the answers mostly agree).

    Agresti & Min (2005): add 1/2 to each cell of the 2×2 agreement table, then Wald; unlike
    plain Wald, the interval keeps a width when the two never disagree.
    a, b: per-item hits as "0"/"1" strings in the same item order.
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_difference needs equal, non-empty hit strings ({len(a)}, {len(b)})"
        )
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n10, n01, m = only_a + 0.5, only_b + 0.5, len(a) + 2
    centre = (n10 - n01) / m
    half = z * math.sqrt((n10 + n01) - (n10 - n01) ** 2 / m) / m
    return {
        "difference": (only_a - only_b) / len(a),
        "ci95": [max(-1.0, centre - half), min(1.0, centre + half)],
        "n": len(a),
        "only_a": only_a,  # discordant items: right only with a, only with b
        "only_b": only_b,
    }
