"""Document embeddings for the detector: the stored centroid router's (mean-pooled hidden
state of the frozen base at the router's layer), so detection sees what routing sees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crma.routing.index import CentroidRouter, CentroidSettings

if TYPE_CHECKING:
    from crma.engine import Engine


def embed_texts(
    engine: Engine, texts: list[str], settings: CentroidSettings | None = None
) -> torch.Tensor:
    """(N, d) float64 embeddings of `texts`, tokenized as the router tokenizes prompts."""
    tok = engine.tokenizer
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    return CentroidRouter(settings).embed(engine, ids)
