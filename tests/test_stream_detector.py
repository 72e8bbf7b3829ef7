"""The stream detector on synthetic embeddings with sharp domain switches (no model)."""

from __future__ import annotations

import pytest
import torch

from crma.stream.detector import Detector, DetectorSettings, Stats
from crma.stream.metrics import match

DIM = 48


def domain_docs(domain: int, n: int, seed: int) -> torch.Tensor:
    """`n` embeddings of synthetic domain `domain`: its own mean, per-dimension spreads."""
    g = torch.Generator().manual_seed(1000 * domain + seed)
    centre = torch.randn(DIM, generator=torch.Generator().manual_seed(domain)) * 3
    spread = torch.rand(DIM, generator=torch.Generator().manual_seed(50 + domain)) + 0.5
    return (centre + spread * torch.randn(n, DIM, generator=g)).double()


def stream(plan: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    parts = [domain_docs(d, n, seed + i) for i, (d, n) in enumerate(plan)]
    starts = [sum(n for _, n in plan[:i]) for i in range(1, len(plan))]
    return torch.cat(parts), starts


def segments_of(x: torch.Tensor, **kw) -> tuple[Detector, list[dict]]:
    det = Detector(DetectorSettings(**kw))
    decisions = det.run(x)
    assert [d.index for d in sorted(decisions, key=lambda d: d.index)] == list(range(len(x)))
    return det, det.segments_dicts()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sharp_switch_is_found_and_a_revisit_is_known(seed):
    x, true = stream([(0, 60), (1, 45), (0, 50), (2, 70), (1, 40)], seed)
    det, segs = segments_of(x)
    found = [s["start"] for s in segs[1:]]
    assert len(match(true, found, margin=10)) == len(true) == len(found), (true, found)
    assert [s["domain"] for s in segs] == ["new-1", "new-2", "new-1", "new-3", "new-2"]
    assert [s["new"] for s in segs] == [True, True, False, True, False]
    delays = [s["decided_at"] - t for t, s in zip(true, segs[1:])]
    assert all(0 <= d <= DetectorSettings().lookahead for d in delays), delays


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_stationary_stream_has_no_boundary(seed):
    _, segs = segments_of(domain_docs(0, 600, seed))
    assert [(s["start"], s["end"], s["domain"]) for s in segs] == [(0, 600, "new-1")]


def test_one_odd_document_is_not_a_new_domain():
    x = torch.cat([domain_docs(0, 50, 0), domain_docs(1, 1, 0), domain_docs(0, 50, 1)])
    _, segs = segments_of(x)
    assert len(segs) == 1


def test_known_domains_of_a_stack_are_recognised():
    known = {"alpha": Stats.of(domain_docs(0, 200, 9)), "beta": Stats.of(domain_docs(1, 200, 9))}
    x, true = stream([(1, 40), (2, 40), (0, 40)])
    det = Detector(DetectorSettings(), known)
    det.run(x)
    segs = det.segments_dicts()
    assert [(s["domain"], s["new"]) for s in segs] == [
        ("beta", False),
        ("new-1", True),
        ("alpha", False),
    ]
    assert len(match(true, [s["start"] for s in segs[1:]], margin=10)) == 2


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(Exception, match="window: expected at most lookahead"):
        DetectorSettings(window=30, lookahead=20)


def test_new_domains_take_the_given_names_then_numbers_not_taken():
    x, _ = stream([(0, 40), (1, 40), (2, 40)])
    det = Detector(DetectorSettings(), {"new-1": Stats.of(domain_docs(3, 50, 0))}, ["alpha"])
    det.run(x)
    assert [s["domain"] for s in det.segments_dicts()] == ["alpha", "new-2", "new-3"]
