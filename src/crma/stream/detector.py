"""Online domain-boundary detection on the router's base embeddings.

Each domain is summarised as the centroid router summarises it: document count, sum and sum
of squares of its embeddings (the stack's domains come straight from the stored router). A
set of documents scores against domain k as log(D / E): D is the squared distance of their
coordinate-wise median to k's mean in k's per-dimension standard deviations, E what D is
expected to be for k's own documents (so about 0 for them, and growing with a shift). The
median keeps one odd document from moving the score much.

The change test is a two-sample test over a sliding window (a linear-kernel MMD with a robust
location): the last `window` documents of the current segment against the current domain,
an alarm when their score reaches `threshold`. The boundary is then placed among the pending
documents by the CUSUM estimate on the documents' own scores (the split after which they
exceed `drift` the most). The documents after it form a candidate segment. Once it holds
`identify_docs` documents the change has to be confirmed: the whole candidate must score at
least `confirm` against the current domain. Under `threshold` it is a false alarm (the
candidate goes back to the current domain); in between, the novelty has to persist: the
candidate grows, document by document, until it reaches `confirm` or `confirm_docs`
documents (then it is cancelled too). A confirmed candidate is named: the known domain (the
stack's, or one found earlier in the stream; not the current one) with the lowest score, if at
most `known_threshold`, else a new domain `new-1`, `new-2`, …. A lowest score within
`known_band` of `known_threshold`, against a domain found in this stream, is in doubt: the
candidate grows up to `confirm_docs` documents before it is named (a wrong domain's score
grows by about log 2 each time the documents double; the right one's stays near 0). Not
against the stack's own domains: they are summarised from their training examples, whose small
offset from stream documents more documents would sharpen as much as a real difference
(tests/test_stream.py has such a case). A document is decided at the latest
`lookahead` documents after it arrived; the reported delay counts every document a decision
waited for.

The default `confirm`, `known_threshold` and `known_band` were set on validation streams of
the embedded corpus (the validation half of each domain's spare pool), `confirm` for half the
target false-alarm rate: see benchmarks/stream.py and results/stream/report.md.
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

    window: int = setting(9, "documents in the change test's sliding window", ge=3)
    threshold: float = setting(0.6, "window score that signals a change", gt=0)
    drift: float = setting(
        0.3, "document score above which a document counts as changed (places the boundary)"
    )
    known_threshold: float = setting(1.0, "score under which a new segment is a known domain", gt=0)
    known_band: float = setting(
        0.25,
        "a domain found in the stream scoring this near known_threshold waits for "
        "confirm_docs documents before the segment is named",
        ge=0,
    )
    identify_docs: int = setting(9, "documents of a new segment used to identify it", ge=2)
    confirm: float = setting(
        1.25, "candidate score against the current domain that confirms a change", gt=0
    )
    confirm_docs: int = setting(
        18, "documents an ambiguous candidate collects before it is decided", ge=2
    )
    lookahead: int = setting(20, "most documents a decision may wait for (part of the delay)", ge=1)

    def check_together(self) -> None:
        for name in ("window", "identify_docs", "confirm_docs"):
            if getattr(self, name) > self.lookahead:
                raise SettingError(
                    name, getattr(self, name), f"at most lookahead ({self.lookahead})"
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
        self.pending: list[_Pending] = []  # documents not decided yet, oldest first
        self.window: list[torch.Tensor] = []  # the current segment's latest documents
        self.candidate = False  # the pending documents start a segment still to be named
        self.seen = 0
        self.opened = 0  # new domains opened so far

    # -- scores --------------------------------------------------------------------------------
    def score(self, xs: torch.Tensor, domain: str) -> float:
        """log(squared distance of the documents' coordinate-wise median to the domain's mean,
        in the domain's standard deviations, / its expected value for the domain's own
        documents): about 0 for them, growing with the shift. One document: its distance."""
        s = self.domains[domain]
        mean = s.sum / s.count
        var = ((s.sumsq - s.count * mean**2) / (s.count - 1)).clamp(min=0)
        var = var + 1e-6 * var.mean() + 1e-12
        centre = xs.median(0).values if len(xs) > 1 else xs[0]
        spread = (1.57 if len(xs) > 2 else 1.0) / len(xs)  # variance factor of the median
        # E[1/variance estimate] = (n-1)/(n-3) / variance: few documents overstate distances
        bias = (s.count - 1) / (s.count - 3) if s.count > 3 else 2.0
        expected = (spread + 1 / s.count) * bias * len(mean)
        return float(torch.log(((centre - mean) ** 2 / var).sum() / expected))

    def scores(self, xs: torch.Tensor) -> dict[str, float]:
        """`score` against every known domain (with at least two documents)."""
        return {d: self.score(xs, d) for d, s in self.domains.items() if s.count >= 2}

    # -- the online loop -------------------------------------------------------------------------
    def push(self, x: torch.Tensor) -> list[Decision]:
        """Take the next document's embedding (d,); return the documents decided by it."""
        index, x = self.seen, x.double()
        self.seen += 1
        single = self.scores(x[None])
        novelty = min(single.values()) if single else None
        if self.current is None or self.candidate:
            self.pending.append(_Pending(index, x, novelty, 0.0, single))
            return self._identify_if_ready(index)
        self.window = [*self.window, x][-self.settings.window :]
        change = (
            self.score(torch.stack(self.window), self.current)
            if len(self.window) == self.settings.window
            else 0.0
        )
        self.pending.append(_Pending(index, x, novelty, change, single))
        if change >= self.settings.threshold:
            decided = self._commit(self._change_point(), index)
            self.candidate = True
            return decided + self._identify_if_ready(index)
        if len(self.pending) > self.settings.lookahead:
            return self._commit(1, index)
        return []

    def _change_point(self) -> int:
        """How many pending documents still belong to the current domain: the split after
        which the documents' own scores exceed `drift` the most (the CUSUM estimate)."""
        steps = [p.scores.get(self.current, 0.0) - self.settings.drift for p in self.pending]
        tails = [sum(steps[i:]) for i in range(len(steps))]
        return max(range(len(steps)), key=lambda i: (tails[i], i))

    def run(self, embeddings: torch.Tensor) -> list[Decision]:
        """Every document of a whole stream (N, d), in order, then `finish`."""
        decisions = [d for x in embeddings for d in self.push(x)]
        return decisions + self.finish()

    def finish(self) -> list[Decision]:
        """End of stream: decide what is pending (the stream's first documents are
        identified with what there is; a candidate change not confirmed yet is cancelled)."""
        if not self.pending:
            return []
        if self.current is None:
            return self._identify(self.seen - 1)
        return self._cancel(self.seen - 1)

    def _commit(self, n: int, now: int) -> list[Decision]:
        """The first `n` pending documents belong to the current domain."""
        done, self.pending = self.pending[:n], self.pending[n:]
        stats = self.domains[self.current] if done else None
        for p in done:
            stats.add(p.x)
        return [Decision(p.index, self.current, p.novelty, p.change, now) for p in done]

    def _identify_if_ready(self, now: int) -> list[Decision]:
        """Once the candidate holds `identify_docs` documents, confirm the change (the whole
        candidate scores at least `confirm` against the current domain) and identify it, or
        cancel it (it scores under `threshold`, or still under `confirm` after `confirm_docs`
        documents). In between the novelty has to persist: wait for more documents; so does a
        name in doubt (the closest domain found in the stream scores within `known_band` of
        `known_threshold`)."""
        s, n = self.settings, len(self.pending)
        if n < s.identify_docs:
            return []
        xs = torch.stack([p.x for p in self.pending])
        waiting = n < s.confirm_docs
        if self.current is not None:
            change = self.score(xs, self.current)
            if change < s.confirm:
                return [] if change >= s.threshold and waiting else self._cancel(now)
        closest = self._closest_known(xs)
        if (
            waiting
            and closest[0] not in self.initial
            and abs(closest[1] - s.known_threshold) < s.known_band
        ):
            return []
        return self._identify(now, closest)

    def _cancel(self, now: int) -> list[Decision]:
        """A false alarm: the candidate goes back to the current domain."""
        self.candidate = False
        return self._commit(len(self.pending), now)

    def _identify(
        self, now: int, closest: tuple[str | None, float] | None = None
    ) -> list[Decision]:
        """Name the (confirmed) candidate segment: a known domain or a new one. `closest`:
        `_closest_known` of the pending documents, if the caller has it already."""
        xs = torch.stack([p.x for p in self.pending])
        known, score = closest or self._closest_known(xs)
        if score > self.settings.known_threshold:
            known = None
        self.candidate = False
        domain, new = (known, False) if known is not None else (self._new_name(), True)
        if self.segments:
            self.segments[-1].end = self.pending[0].index
        self.segments.append(Segment(self.pending[0].index, domain, new, now))
        self.current = domain
        self.window = list(xs[-self.settings.window :])
        if new:
            self.domains[domain] = Stats.of(xs)
            done, self.pending = self.pending, []
            return [Decision(p.index, domain, p.novelty, p.change, now) for p in done]
        return self._commit(len(self.pending), now)

    def _closest_known(self, xs: torch.Tensor) -> tuple[str | None, float]:
        """The known domain that scores the documents lowest, and its score (inf if none). Not
        the current one: the change test has just ruled it out."""
        scores = {d: v for d, v in self.scores(xs).items() if d != self.current}
        best = min(scores, key=scores.__getitem__, default=None)
        return best, (scores[best] if best is not None else float("inf"))

    def _new_name(self) -> str:
        self.opened += 1
        if self.opened <= len(self.names):
            return self.names[self.opened - 1]
        k = self.opened - len(self.names)
        while f"{NEW_PREFIX}{k}" in self.domains:  # a stack that a stream already grew
            k += 1
        return f"{NEW_PREFIX}{k}"

    def segments_dicts(self) -> list[dict[str, Any]]:
        """Segments so far; the open one ends at the last document seen."""
        out = [s.to_dict() for s in self.segments]
        if out and out[-1]["end"] == -1:
            out[-1]["end"] = self.seen
        return out


class Oracle:
    """The true segmentation `[{start, end, domain}]` replayed through the detector's interface,
    each document decided on arrival: the reference that a detector-driven stream is compared
    with (benchmarks/stream.py --with-training)."""

    def __init__(self, truth: list[dict[str, Any]], known: list[str] | None = None):
        self.truth = truth
        self.initial = list(known or [])
        self.segments: list[Segment] = []
        self.seen = 0

    def push(self, x: torch.Tensor) -> list[Decision]:
        index = self.seen
        self.seen += 1
        domain = next(s["domain"] for s in self.truth if s["start"] <= index < s["end"])
        if not self.segments or self.segments[-1].domain != domain:
            if self.segments:
                self.segments[-1].end = index
            new = domain not in self.initial and all(s.domain != domain for s in self.segments)
            self.segments.append(Segment(index, domain, new, index))
        return [Decision(index, domain, None, 0.0, index)]

    def finish(self) -> list[Decision]:
        return []

    segments_dicts = Detector.segments_dicts
