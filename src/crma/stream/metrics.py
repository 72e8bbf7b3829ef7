"""How well a stream was segmented, measured as change-point detection is.

A segmentation is a list of segments `{start, end, domain}` (end exclusive) covering the
stream; its boundaries are the segment starts after the first. A detected boundary matches a
true one within `margin` documents, one to one (closest pairs first). Scores of many streams
are pooled (micro-averaged): precision = matched / detected, recall = matched / true.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def boundaries(segments: list[dict[str, Any]]) -> list[int]:
    """Start of every segment but the first."""
    return [s["start"] for s in segments[1:]]


def labels(segments: list[dict[str, Any]]) -> list[str]:
    """The domain of every document."""
    return [s["domain"] for s in segments for _ in range(s["start"], s["end"])]


def match(true: list[int], detected: list[int], margin: int) -> list[tuple[int, int]]:
    """One-to-one (true, detected) pairs at most `margin` apart, closest pairs first."""
    pairs = sorted((abs(t - d), t, d) for t in true for d in detected if abs(t - d) <= margin)
    used_t, used_d, out = set(), set(), []
    for _, t, d in pairs:
        if t not in used_t and d not in used_d:
            used_t.add(t)
            used_d.add(d)
            out.append((t, d))
    return sorted(out)


def adjusted_rand_index(a: list[str], b: list[str]) -> float:
    """ARI of two labelings of the same documents (1 = identical partitions)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


@dataclass
class StreamScore:
    """Counts of one stream; `pool` turns many into rates."""

    docs: int
    true: int  # true boundaries
    detected: int
    matched: int
    delays: list[int] = field(default_factory=list)  # per matched boundary
    new_known_right: int = 0  # matched boundaries whose new/known call is right
    adapters: int = 0  # new domains the detector opened
    true_adapters: int = 0  # domains new to the detector in truth
    ari: float = 1.0


def score_stream(
    truth: list[dict[str, Any]],
    detected: list[dict[str, Any]],
    margin: int,
    known: set[str] = frozenset(),
) -> StreamScore:
    """Score one stream. Segments of `detected` carry `decided_at` (the document index at which
    the detector announced them; the delay is counted to it) and `new` (opened a new domain);
    `known`: the domains the detector knew before the stream (the truth's others are new at
    their first segment)."""
    true_b, det_b = boundaries(truth), boundaries(detected)
    pairs = match(true_b, det_b, margin)
    decided = {s["start"]: s.get("decided_at", s["start"]) for s in detected}
    is_new_det = {s["start"]: bool(s.get("new")) for s in detected}
    is_new_true = _first_appearances(truth, known)
    return StreamScore(
        docs=truth[-1]["end"],
        true=len(true_b),
        detected=len(det_b),
        matched=len(pairs),
        delays=[decided[d] - t for t, d in pairs],
        new_known_right=sum(is_new_det[d] == is_new_true[t] for t, d in pairs),
        adapters=sum(bool(s.get("new")) for s in detected),
        true_adapters=sum(is_new_true.values()),
        ari=adjusted_rand_index(labels(truth), labels(detected)),
    )


def _first_appearances(truth: list[dict[str, Any]], known: set[str]) -> dict[int, bool]:
    """Segment start -> whether its domain appears there for the first time (and is unknown)."""
    seen, out = set(known), {}
    for s in truth:
        out[s["start"]] = s["domain"] not in seen
        seen.add(s["domain"])
    return out


def pool(scores: list[StreamScore]) -> dict[str, Any]:
    """Pooled figures of many streams."""
    detected = sum(s.detected for s in scores)
    true = sum(s.true for s in scores)
    matched = sum(s.matched for s in scores)
    docs = sum(s.docs for s in scores)
    delays = [d for s in scores for d in s.delays]
    precision = matched / detected if detected else 1.0
    recall = matched / true if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "streams": len(scores),
        "docs": docs,
        "true_boundaries": true,
        "detected_boundaries": detected,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "delay_mean": float(np.mean(delays)) if delays else None,
        "delay_p90": float(np.percentile(delays, 90)) if delays else None,
        "false_alarms_per_10k": 1e4 * (detected - matched) / docs if docs else 0.0,
        "new_known_accuracy": sum(s.new_known_right for s in scores) / matched if matched else None,
        "adapters_exact": sum(s.adapters == s.true_adapters for s in scores),
        "adapters": [s.adapters for s in scores],
        "ari_mean": float(np.mean([s.ari for s in scores])) if scores else None,
    }
