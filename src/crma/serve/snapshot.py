"""A loaded stack as the batcher serves it: model names, adapters per row, stop tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from crma.errors import UserError
from crma.generate import AUTO, BASE, StackModel, adapter_names
from crma.serve.config import ServeSettings
from crma.serve.mixed import RowAdapters
from crma.serve.prefill import TemplateHead

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
        self.rows = RowAdapters.attach(self.engine.base) if self.mixable else None
        if self.rows is not None:  # routing then leaves PEFT's adapter state alone too
            model.router.frozen_base = self._frozen_base
        self.head = TemplateHead(self)
        self.eos = _eos_ids(self.engine)
        # Embedding tables are often padded beyond the tokenizer: those ids decode to nothing.
        self.vocab = len(self.engine.tokenizer)

    @property
    def names(self) -> list[str]:
        """Model names a request may use."""
        return [AUTO, *self.domains, BASE_MODEL]

    def adapters(self, domain: str | None) -> str | list[str] | None:
        return self.model.adapters(domain)

    def logits(self, ids, mask, positions, cache, adapters: list) -> torch.Tensor:
        """Last-position logits (B, V) float32 of one forward, each row through its adapters."""
        engine = self.engine
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "cache": cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if engine.peft is None:
            return engine.model(**kwargs).logits[:, -1].float()
        if self.rows is not None:
            with self.rows.using([a or BASE for a in adapters]):
                return engine.base(**kwargs).logits[:, -1].float()
        context = nullcontext()
        if self.mixable:
            kwargs["adapter_names"] = [a or BASE for a in adapters]
        else:
            context = engine.using(adapters[0])
        with context:
            return engine.model(**kwargs).logits[:, -1].float()

    @contextmanager
    def _frozen_base(self) -> Iterator[Callable[..., Any]]:
        """The base alone for the router: every row through '__base__' by the row hooks (no
        PEFT adapter toggling, which walks every module), the backbone off. The model is in
        eval mode already (load_stack)."""
        rows, base = self.rows, self.engine.base
        assert rows is not None

        def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            with rows.using([BASE] * len(input_ids)):
                return base(input_ids=input_ids, attention_mask=attention_mask)

        with self.engine.backbone_on(False):
            yield forward

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
        """Fit the router and compute the template head's keys and values under every model
        now (both are lazy), so the first requests do not wait for them."""
        if self.domains and self.model.cm.method.needs_task_id:
            self.model.resolve(["warm-up"], AUTO)
        if self.head.ids:
            with torch.no_grad():
                for domain in [*self.domains, None]:
                    self.head.kv(self.adapters(domain))


def _eos_ids(engine) -> set[int]:
    ids = {engine.tokenizer.eos_token_id}
    eos = getattr(getattr(engine.base, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids if i is not None}
