"""Baselines of the streaming benchmark (benchmarks/stream.py): each turns a stream into
detected segments `{start, end, domain, new, decided_at}`."""

from __future__ import annotations

import numpy as np
import torch

OFFLINE = "(offline)"  # a method that sees the whole stream: no delay to report


def oracle(truth: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for s in truth:
        out.append({**s, "new": s["domain"] not in seen, "decided_at": s["start"]})
        seen.add(s["domain"])
    return out


def fixed_segments(n: int, starts: list[int], decided: list[int] | None = None) -> list[dict]:
    """Every piece between `starts` is a new domain (no identification)."""
    edges = [0, *starts, n]
    decided = decided or [0, *starts]
    return [
        {"start": a, "end": b, "domain": f"new-{i + 1}", "new": True, "decided_at": d}
        for i, (a, b, d) in enumerate(zip(edges, edges[1:], decided))
    ]


def every_n(n: int, period: int) -> list[dict]:
    return fixed_segments(n, list(range(period, n, period)))


def loss_spike(losses: list[float], window: int, k: float) -> list[dict]:
    """Aljundi et al. (2019)-style: a new task when the mean loss of the last `window` documents
    leaves the current plateau (the documents since the last boundary, before the window) by
    more than `k` standard errors, either way (the frozen base's loss has no learning dip to
    wait for). Online; the boundary goes at the start of the window."""
    c1 = np.concatenate([[0.0], np.cumsum(losses)])
    c2 = np.concatenate([[0.0], np.cumsum(np.square(losses))])
    starts, decided, begin = [], [0], 0
    for t in range(len(losses)):
        w0 = t - window + 1  # the window is [w0, t]
        if w0 - begin < 2 * window:
            continue
        n = w0 - begin
        mean = (c1[w0] - c1[begin]) / n
        sd = max((c2[w0] - c2[begin] - n * mean**2) / (n - 1), 1e-12) ** 0.5
        if abs((c1[t + 1] - c1[w0]) / window - mean) > k * sd / window**0.5:
            starts.append(w0)
            decided.append(t)
            begin = w0
    return fixed_segments(len(losses), starts, decided)


def router_score(x: torch.Tensor, threshold: float) -> list[dict]:
    """The stored router's score alone: a document whose best prototype cosine (the centroid
    router's `prototype` head on the domains so far) is under `threshold` opens a new domain,
    else it goes to the best domain; a boundary wherever the domain changes."""
    from crma.routing.index import CentroidRouter

    router = CentroidRouter()
    out: list[dict] = []
    for t, doc in enumerate(x):
        if router.domains:
            scores = router.scores(doc[None])[0]
            k = int(scores.argmax())
            known = float(scores[k]) >= threshold
        if not router.domains or not known:
            name = f"new-{len(router.domains) + 1}"
            router.domains.append(name)
            stats = [doc.new_ones(1), doc[None], (doc * doc)[None]]
            if len(router.domains) == 1:
                router.count, router.sum, router.sumsq = stats
            else:
                router.count = torch.cat([router.count, stats[0]])
                router.sum = torch.cat([router.sum, stats[1]])
                router.sumsq = torch.cat([router.sumsq, stats[2]])
            new = True
        else:
            name, new = router.domains[k], False
            router.count[k] += 1
            router.sum[k] += doc
            router.sumsq[k] += doc * doc
        if not out or out[-1]["domain"] != name:
            if out:
                out[-1]["end"] = t
            out.append({"start": t, "end": -1, "domain": name, "new": new, "decided_at": t})
    out[-1]["end"] = len(x)
    return out


def kernel_cpd(x: torch.Tensor, penalty: float) -> list[dict]:
    """Offline kernel change-point detection (ruptures KernelCPD, RBF kernel) on the stream's
    standardised embeddings; it sees the whole stream, so its delay is not comparable."""
    import ruptures

    z = ((x - x.mean(0)) / (x.std(0) + 1e-6)).numpy()
    ends = ruptures.KernelCPD(kernel="rbf", min_size=5).fit(z).predict(pen=penalty)
    starts = ends[:-1]
    return fixed_segments(len(x), starts, [len(x) - 1] * len(ends))  # decided at the end
