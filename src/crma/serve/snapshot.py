"""A loaded stack as the batcher serves it: model names, adapters per row, stop tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from crma.errors import UserError
from crma.generate import AUTO, StackModel, adapter_names
from crma.serve.config import ServeSettings

BASE_MODEL = "base"  # the model name of "no domain adapter" (base + CRMA backbone)


@dataclass
class Routed:
    """Which domain answers a request; for `auto`, the router's confidence and its probability
    for every domain (the softmax the confidence is the largest of)."""

    domain: str | None
    confidence: float | None = None
    scores: dict[str, float] | None = None


class Snapshot:
    """A loaded stack as the batcher serves it: model names, adapters per row, stop tokens."""

    def __init__(self, model: StackModel, settings: ServeSettings):
        self.model = model
        cm = model.cm
        self.engine = cm.engine
        config = self.engine.base.config.get_text_config(decoder=True)
        own = getattr(config, "max_position_embeddings", None) or 2048
        self.max_context = min(settings.max_context or own, own)
        self.domains = model.domains
        try:  # methods summing several adapters per domain cannot mix rows in one forward
            adapter_names(cm, self.domains)
            self.mixable = True
        except UserError:
            self.mixable = False
        # Requests join a batch by merging caches: plain full-attention layers only (not
        # sliding windows); otherwise one request is decoded at a time.
        layers = DynamicCache(config=self.engine.base.config).layers
        self.batchable = self.mixable and all(type(layer) is DynamicLayer for layer in layers)
        if self.engine.peft is not None and self.mixable:  # once: rows pick their own adapter
            self.engine.activate(self.engine.adapters[0])
        self.eos = _eos_ids(self.engine)
        # Embedding tables are often padded beyond the tokenizer: those ids decode to nothing.
        self.vocab = len(self.engine.tokenizer)

    @property
    def names(self) -> list[str]:
        """Model names a request may use."""
        return [AUTO, *self.domains, BASE_MODEL]

    def adapters(self, domain: str | None) -> str | list[str] | None:
        return self.model.adapters(domain)

    def route(self, texts: list[str]) -> list[Routed]:
        """Where `auto` sends each text (as StackModel.resolve), with every domain's score."""
        model = self.model
        if not (self.domains and model.cm.method.needs_task_id):
            return [Routed(d, c) for d, c in model.resolve(texts, AUTO)]
        out = []
        for route in model.route(texts):
            raw = torch.tensor(list(route.scores.values()), dtype=torch.float64)
            probs = torch.softmax(raw / model.router.temperature, dim=0).tolist()
            out.append(Routed(route.domain, route.confidence, dict(zip(route.scores, probs))))
        return out

    def warm_up(self) -> None:
        """Fit the router now (it is fitted lazily), so the first routed request does not wait."""
        if self.domains and self.model.cm.method.needs_task_id:
            self.model.resolve(["warm-up"], AUTO)


def _eos_ids(engine) -> set[int]:
    ids = {engine.tokenizer.eos_token_id}
    eos = getattr(getattr(engine.base, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids if i is not None}
