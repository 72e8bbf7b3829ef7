"""The detector over a sequence of documents: embeddings in fixed chunks, decisions, segments.

Shared by `crma segment` (detection only) and `crma stream` (detection driving training).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from crma.data.formats import record_text
from crma.routing.index import CentroidRouter, CentroidSettings
from crma.stream.detector import Decision, Detector, DetectorSettings, Stats
from crma.stream.embedding import embed_texts

if TYPE_CHECKING:
    from crma.engine import Engine
    from crma.stack import Stack

# Documents embedded together. Fixed, so a rerun (a resumed `crma stream`) computes
# bit-identical embeddings and so the same decisions.
CHUNK = 16


def known_domains(
    stack: Stack, domains: list[str] | None = None
) -> tuple[dict[str, Stats], CentroidSettings]:
    """The stored router's statistics of `domains` (default: all the stack's), and its embedding
    settings: what the detector knows before the stream starts."""
    router = CentroidRouter.load(stack)
    wanted = router.domains if domains is None else domains
    known = {
        d: Stats(float(router.count[i]), router.sum[i], router.sumsq[i])
        for i, d in enumerate(router.domains)
        if d in wanted
    }
    return known, router.settings


def chunk_embeddings(
    engine: Engine, texts: list[str], settings: CentroidSettings, start: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first index, (n, d) embeddings) per CHUNK of `texts`, from chunk `start // CHUNK`."""
    bar = tqdm(total=len(texts), initial=start, desc="stream", unit="doc", disable=None)
    for first in range(start - start % CHUNK, len(texts), CHUNK):
        yield first, embed_texts(engine, texts[first : first + CHUNK], settings)
        bar.update(min(CHUNK, len(texts) - first))
    bar.close()


def segment_records(
    engine: Engine,
    records: list[dict[str, Any]],
    settings: DetectorSettings,
    known: dict[str, Stats],
    embedding: CentroidSettings,
) -> dict[str, Any]:
    """Run the detector over `records`; the segments and every document's decision."""
    detector = Detector(settings, known)
    decisions: list[Decision] = []
    for _, chunk in chunk_embeddings(engine, [record_text(r) for r in records], embedding):
        for x in chunk:
            decisions += detector.push(x)
    decisions += detector.finish()
    return result(detector, decisions)


def result(detector: Detector, decisions: list[Decision]) -> dict[str, Any]:
    return {
        "documents": detector.seen,
        "known": list(detector.initial),
        "segments": detector.segments_dicts(),
        "decisions": [d.to_dict() for d in sorted(decisions, key=lambda d: d.index)],
    }
