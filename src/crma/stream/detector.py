"""Online domain-boundary detection on the router's base embeddings (issue 20).

Each domain is summarised as the centroid router summarises it: document count, sum and sum of
squares of its embeddings, and every distance is measured in the router's pooled
standardisation (per dimension, over all domains' documents). A document's score against
domain k is log r_k, where r_k is its squared standardised distance to k's mean divided by the
distance an own document of k is expected to have; about 0 for k's documents, large for others.

The change test is a CUSUM on the current domain's score: S ← max(0, S + min(score − drift,
cap)), an alarm at S ≥ threshold. `cap` < `threshold`, so one odd document never alarms. The
documents since S last left 0 are pending (not yet added to any domain); at an alarm they start
a candidate segment, which is identified once it holds `identify_docs` documents: the known
domain (the stack's, or one opened earlier in the stream) with the lowest median score if that
median is at most `known_threshold`, else a new domain `new-1`, `new-2`, …. A candidate
identified as the current domain was a false run and goes back to it. A pending document is
decided at the latest `lookahead` documents later, so every decision waits a bounded number of
documents (counted in the reported delay).

The default thresholds were set on validation streams of the embedded corpus (the validation
half of each domain's spare pool) for a target false-alarm rate: see benchmarks/stream.py and
results/stream/report.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from crma.settings import SettingError, Settings, setting

NEW_PREFIX = "new-"


@dataclass
class DetectorSettings(Settings):
    """How the stream detector decides where a domain starts and which one it is."""

    drift: float = setting(1.0, "CUSUM drift: score a document must exceed to count", ge=0)
    cap: float = setting(3.0, "largest CUSUM step of one document (so one cannot alarm)", gt=0)
    threshold: float = setting(8.0, "CUSUM level that signals a change", gt=0)
    known_threshold: float = setting(
        1.5, "median score under which a new segment is a known domain", gt=0
    )
    identify_docs: int = setting(5, "documents of a new segment used to identify it", ge=2)
    lookahead: int = setting(16, "most documents a decision may wait for (part of the delay)", ge=1)

    def check_together(self) -> None:
        if self.cap >= self.threshold:
            raise SettingError("cap", self.cap, f"less than threshold ({self.threshold})")
        if self.identify_docs > self.lookahead:
            raise SettingError(
                "identify_docs", self.identify_docs, f"at most lookahead ({self.lookahead})"
            )


@dataclass
class Stats:
    """Count, sum and sum of squares of a domain's embeddings (the router's statistics)."""

    count: float
    sum: torch.Tensor  # (d,)
    sumsq: torch.Tensor  # (d,)

    @classmethod
    def of(cls, embeddings: torch.Tensor) -> Stats:
        e = embeddings.double()
        return cls(float(len(e)), e.sum(0), (e * e).sum(0))

    def add(self, x: torch.Tensor) -> None:
        self.count += 1
        self.sum = self.sum + x
        self.sumsq = self.sumsq + x * x


@dataclass
class Segment:
    start: int
    domain: str
    new: bool
    decided_at: int  # index of the document whose arrival decided it
    end: int = -1  # exclusive; -1 while open

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "domain": self.domain,
            "new": self.new,
            "decided_at": self.decided_at,
        }


@dataclass
class Decision:
    """One document's final assignment, with the scores seen when it arrived."""

    index: int
    domain: str
    novelty: float | None  # lowest score against the domains known when it arrived
    change: float  # CUSUM statistic after it
    decided_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "domain": self.domain,
            "novelty": None if self.novelty is None else round(self.novelty, 4),
            "change": round(self.change, 4),
            "decided_at": self.decided_at,
        }


@dataclass
class _Pending:
    index: int
    x: torch.Tensor
    novelty: float | None
    change: float
    scores: dict[str, float] = field(default_factory=dict)


class Detector:
    """Feed embeddings one at a time with `push`; it returns the documents it has decided."""

    def __init__(
        self,
        settings: DetectorSettings | None = None,
        known: dict[str, Stats] | None = None,
        names: list[str] | None = None,
    ):
        """`known`: the domains known before the stream (the stack's router statistics);
        `names`: what to call the new domains, in order (then new-1, new-2, ...)."""
        self.settings = settings or DetectorSettings()
        self.domains: dict[str, Stats] = dict(known or {})
        self.initial = list(self.domains)
        self.names = list(names or [])
        self.segments: list[Segment] = []
        self.current: str | None = None
        self.cusum = 0.0
        self.pending: list[_Pending] = []
        self.candidate = False  # pending documents form a candidate segment being identified
        self.seen = 0
        self.opened = 0  # new domains opened so far

    # -- scores --------------------------------------------------------------------------------
    def _variance(self) -> torch.Tensor:
        """Pooled per-dimension variance over every domain's documents (as the router's)."""
        stats = list(self.domains.values())
        n = sum(s.count for s in stats)
        mean = sum(s.sum for s in stats) / n
        var = (sum(s.sumsq for s in stats) / n - mean**2).clamp(min=0)
        return var + 1e-6 * var.mean() + 1e-12

    def scores(self, x: torch.Tensor) -> dict[str, float]:
        """log(squared standardised distance to each domain's mean / its expected value)."""
        if not self.domains:
            return {}
        var = self._variance()
        out = {}
        for name, s in self.domains.items():
            if s.count < 2:
                continue
            mean = s.sum / s.count
            own_var = ((s.sumsq - s.count * mean**2) / (s.count - 1)).clamp(min=0)
            expected = (1 + 1 / s.count) * (own_var / var).sum()
            out[name] = float(torch.log(((x - mean) ** 2 / var).sum() / expected))
        return out

    # -- the online loop -------------------------------------------------------------------------
    def push(self, x: torch.Tensor) -> list[Decision]:
        """Take the next document's embedding (d,); return the documents decided by it."""
        index, x = self.seen, x.double()
        self.seen += 1
        scores = self.scores(x)
        novelty = min(scores.values()) if scores else None
        if self.current is not None and not self.candidate:
            step = scores.get(self.current, self.settings.cap) - self.settings.drift
            self.cusum = max(0.0, self.cusum + min(step, self.settings.cap))
        self.pending.append(_Pending(index, x, novelty, self.cusum, scores))
        if self.current is None or self.candidate:
            return self._identify_if_ready(index)
        if self.cusum == 0.0:
            return self._commit(len(self.pending), index)
        if self.cusum >= self.settings.threshold:
            self.candidate = True
            return self._identify_if_ready(index)
        if len(self.pending) > self.settings.lookahead:
            return self._commit(1, index)
        return []

    def run(self, embeddings: torch.Tensor) -> list[Decision]:
        """Every document of a whole stream (N, d), in order, then `finish`."""
        decisions = [d for x in embeddings for d in self.push(x)]
        return decisions + self.finish()

    def finish(self) -> list[Decision]:
        """End of stream: decide what is pending (a candidate too short to identify is
        identified with what it has)."""
        if not self.pending:
            return []
        if self.current is None or self.candidate:
            return self._identify(self.seen - 1)
        return self._commit(len(self.pending), self.seen - 1)

    def _commit(self, n: int, now: int) -> list[Decision]:
        """The first `n` pending documents belong to the current domain."""
        done, self.pending = self.pending[:n], self.pending[n:]
        stats = self.domains[self.current]
        for p in done:
            stats.add(p.x)
        return [Decision(p.index, self.current, p.novelty, p.change, now) for p in done]

    def _identify_if_ready(self, now: int) -> list[Decision]:
        if len(self.pending) < self.settings.identify_docs:
            return []
        return self._identify(now)

    def _identify(self, now: int) -> list[Decision]:
        """Name the candidate segment: a known domain, back to the current one, or new."""
        domain, new = self._match()
        self.candidate, self.cusum = False, 0.0
        if domain != self.current:
            if self.segments:
                self.segments[-1].end = self.pending[0].index
            self.segments.append(Segment(self.pending[0].index, domain, new, now))
            if new:
                self.domains[domain] = Stats.of(torch.stack([p.x for p in self.pending]))
                done, self.pending = self.pending, []
                self.current = domain
                return [Decision(p.index, domain, p.novelty, p.change, now) for p in done]
            self.current = domain
        return self._commit(len(self.pending), now)

    def _match(self) -> tuple[str, bool]:
        """The known domain with the lowest median score over the pending documents, if it is
        under `known_threshold`; else the next new domain."""
        candidates = self.scores_of_pending()
        if candidates:
            best = min(candidates, key=candidates.__getitem__)
            if candidates[best] <= self.settings.known_threshold:
                return best, False
        return self._new_name(), True

    def _new_name(self) -> str:
        self.opened += 1
        if self.opened <= len(self.names):
            return self.names[self.opened - 1]
        k = self.opened - len(self.names)
        while f"{NEW_PREFIX}{k}" in self.domains:  # a stack that a stream already grew
            k += 1
        return f"{NEW_PREFIX}{k}"

    def scores_of_pending(self) -> dict[str, float]:
        """Median score of the pending documents against each domain (scored afresh)."""
        xs = [p.x for p in self.pending]
        per_doc = [self.scores(x) for x in xs]
        names = set(per_doc[0]) if per_doc else set()
        return {
            name: float(torch.tensor([s[name] for s in per_doc]).median()) for name in sorted(names)
        }

    def segments_dicts(self) -> list[dict[str, Any]]:
        """Segments so far; the open one ends at the last document seen."""
        out = [s.to_dict() for s in self.segments]
        if out and out[-1]["end"] == -1:
            out[-1]["end"] = self.seen
        return out
