"""How well a router routes: top-1 per domain on held-out texts, the confusion matrix, its plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crma.fileio import atomic_path
from crma.routing.router import STORED

if TYPE_CHECKING:
    from crma.routing.router import Router

FALLBACK = "none"  # label of "no adapter" in confusion matrices


def routing_metrics(router: Router, holdouts: dict[str, list[list[int]]]) -> dict[str, Any]:
    """Top-1 accuracy per domain on its holdout texts and the confusion matrix.

    `confusion[i][j]`: texts of domain i routed to label j; labels = domains + ["none"]
    (fallback to no adapter).
    """
    labels = [*router.domains, FALLBACK]
    confusion, top1, routes_by_domain = [], {}, {}
    for domain, ids_list in holdouts.items():
        routes = router.route_ids(ids_list)
        row = [0] * len(labels)
        for r in routes:
            row[labels.index(r.domain or FALLBACK)] += 1
        confusion.append(row)
        top1[domain] = row[labels.index(domain)] / len(routes) if domain in labels else 0.0
        routes_by_domain[domain] = [r.domain for r in routes]
    kind = router.settings.router
    return {
        "router": kind,
        **({"head": router.stored.head} if kind in STORED else {}),
        "threshold": router.settings.threshold,
        "domains": list(holdouts),
        "labels": labels,
        "top1": top1,
        "top1_mean": sum(top1.values()) / max(1, len(top1)),
        "confusion": confusion,
        "routes": routes_by_domain,
    }


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true domain × routed label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[v / max(1, sum(r)) for v in r] for r in metrics["confusion"]]
    labels, domains = metrics["labels"], metrics["domains"]
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2, 0.8 * len(domains) + 1.5))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(metrics["confusion"]):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rows[i][j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel("routed to")
    ax.set_ylabel("holdout of")
    ax.set_title(title or f"router: {metrics['router']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
