"""The `Router` façade: routes prompts of a stack opened as a ContinualModel with the stored
centroid router, Arrow or the loss bound, and falls back to no adapter below a threshold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from crma.batching import pad, pad_id
from crma.errors import UserError
from crma.eval.loss import sequence_nll
from crma.routing.arrow import arrow_scores, arrow_vectors
from crma.routing.embed import FrozenBase
from crma.routing.index import SERVING, CentroidRouter, CentroidSettings
from crma.settings import Settings, setting

if TYPE_CHECKING:
    from crma.continual import ContinualModel
    from crma.engine import Engine

ROUTERS = ("centroid", "fast", "arrow", "loss")
STORED = ("centroid", "fast")  # routers stored in the stack (the main one, the serving one)
# Softmax temperatures that turn scores into confidences; the logistic head's scores are
# already log-probabilities.
DEFAULT_TEMPERATURE = {"prototype": 0.05, "logistic": 1.0, "arrow": 0.01, "loss": 0.1}


@dataclass
class RouteSettings(Settings):
    """How prompts are routed to a domain's adapter."""

    router: Literal["centroid", "fast", "arrow", "loss"] = setting(
        "centroid",
        "centroid (the stack's router: hidden state 8 of 30 on the embedded model), fast (the "
        "stack's serving router: hidden state 1, about 8x cheaper to run; validation top-1 of "
        "passages 99.3 against 99.5 in the worst domain, of MMLU-style questions 50.9 against "
        "60.0 on average: results/tuning/router-serving.md), arrow (from adapter weights), "
        "loss (slow bound)",
    )
    threshold: float = setting(
        0.0, "below this confidence, answer without adapter (base + CRMA backbone)", ge=0, le=1
    )
    confidence_temperature: float | None = setting(
        None,
        "softmax temperature of the confidence (default: 1 logistic head, 0.05 prototype head, "
        "0.01 arrow, 0.1 loss)",
        gt=0,
    )


@dataclass
class Route:
    """Where one prompt goes: `domain` None means no adapter (confidence under threshold)."""

    domain: str | None
    confidence: float
    best: str  # the top-scoring domain, also when falling back
    scores: dict[str, float] = field(default_factory=dict)


def refresh_router(
    cm: ContinualModel,
    examples: dict[str, list[dict]],
    route_examples: dict[str, list[dict]] | None = None,
) -> bool:
    """Rebuild a router that is not what this crma would store (one written before routers
    stored embeddings, with other settings than today's defaults, or with other route examples
    than `route_examples` per domain) from each domain's training `examples` and its route
    examples, so a protocol run measures the router it asks for; True if rebuilt."""
    route_examples = route_examples or {}
    old = CentroidRouter.load(cm.stack)
    current = old.settings == CentroidSettings() and old.head == old.settings.head
    counts = {d: len(route_examples[d]) for d in cm.stack.domains if route_examples.get(d)}
    if current and set(old.domains) == set(cm.stack.domains) and old.route_examples == counts:
        return False
    router = CentroidRouter(serving=SERVING)
    for domain in cm.stack.domains:
        router.add_examples(cm.engine, domain, examples[domain], route_examples.get(domain, ()))
    with cm.writing():
        commit = cm.stack.begin_commit()
        router.save(commit)
        commit.finish()
    return True


class Router:
    """Routes token ids or texts of a stack opened as a ContinualModel."""

    def __init__(self, cm: ContinualModel, settings: RouteSettings | None = None):
        self.cm, self.settings = cm, settings or RouteSettings()
        self.domains = list(cm.stack.domains)
        # How the centroid router runs the frozen base (None: through the engine, which
        # toggles the adapters; a server sets one that leaves them alone).
        self.frozen_base: FrozenBase | None = None
        self._centroid: CentroidRouter | None = None
        self._arrow: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def temperature(self) -> float:
        kind = self.settings.router
        head = self.stored.head if kind in STORED else kind
        return self.settings.confidence_temperature or DEFAULT_TEMPERATURE[head]

    def route_texts(self, texts: list[str]) -> list[Route]:
        tok = self.cm.engine.tokenizer
        return self.route_ids([tok(t, add_special_tokens=True)["input_ids"] for t in texts])

    def route_ids(self, ids_list: list[list[int]]) -> list[Route]:
        """One route per token-id list."""
        if not self.domains:
            raise UserError(f"{self.cm.stack.path}: the stack has no domains to route to")
        scores = self.scores(ids_list)  # (N, K), higher = better
        return decide(scores, self.domains, self.temperature, self.settings.threshold)

    def scores(self, ids_list: list[list[int]]) -> torch.Tensor:
        kind = self.settings.router
        if kind in STORED:
            return self._centroid_scores(ids_list)
        if kind == "arrow":
            return self._arrow_scores(ids_list)
        return self._loss_scores(ids_list)

    @property
    def centroid(self) -> CentroidRouter:
        """The stack's stored centroid router (loaded once)."""
        if self._centroid is None:
            self._centroid = CentroidRouter.load(self.cm.stack)
            missing = [d for d in self.domains if d not in self._centroid.domains]
            if missing:
                raise UserError(
                    f"{self.cm.stack.path}: the centroid router lacks {', '.join(missing)} "
                    "(stack trained before routing existed); use --router arrow or retrain"
                )
        return self._centroid

    @property
    def stored(self) -> CentroidRouter:
        """The stored router this one routes with: the main one, or its serving router."""
        if self.settings.router == "centroid":
            return self.centroid
        return serving_router(self.cm.stack.path, self.centroid)

    def _centroid_scores(self, ids_list: list[list[int]]) -> torch.Tensor:
        c = self.stored
        if len(c.domains) == 1:
            return torch.zeros(len(ids_list), 1, dtype=torch.float64)
        scores = c.scores(c.embed(self.cm.engine, ids_list, self.frozen_base))
        return scores[:, [c.domains.index(d) for d in self.domains]]

    def _arrow_scores(self, ids_list: list[list[int]]) -> torch.Tensor:
        if self._arrow is None:
            self._arrow = arrow_vectors(self.cm.engine, self.domains, self.cm.method.adapter_name)
        return arrow_scores(self.cm.engine, self._arrow, ids_list, self.domains)

    def _loss_scores(self, ids_list: list[list[int]]) -> torch.Tensor:
        cols = [
            -prompt_losses(self.cm.engine, ids_list, self.cm.method.eval_adapters(d))
            for d in self.domains
        ]
        return torch.stack(cols, dim=1).double()

    def adapters_for(self, route: Route) -> str | list[str] | None:
        """The adapters that answer a route (None: base + backbone)."""
        return self.cm.method.eval_adapters(route.domain) if route.domain else None


def serving_router(stack: Path, centroid: CentroidRouter) -> CentroidRouter:
    """The stack's serving router (`--router fast`); a one-line error if it has none."""
    if centroid.serving is None:
        raise UserError(
            f"{stack}: --router fast needs the stack's serving router, and its router was "
            "written before crma stored one; use --router centroid"
        )
    return centroid.serving


def decide(
    scores: torch.Tensor, domains: list[str], temperature: float, threshold: float
) -> list[Route]:
    """Routes from scores (N, K): the top domain, or none when its softmax(scores /
    temperature) confidence is under `threshold`."""
    conf = torch.softmax(scores / temperature, dim=-1)
    routes = []
    for row_scores, row_conf in zip(scores.tolist(), conf.tolist()):
        k = max(range(len(row_conf)), key=row_conf.__getitem__)
        ok = row_conf[k] >= threshold
        detail = dict(zip(domains, row_scores))
        routes.append(Route(domains[k] if ok else None, row_conf[k], domains[k], detail))
    return routes


def adapter_key(adapters: str | list[str] | None) -> tuple[str, ...]:
    """A hashable name for a set of active adapters (empty: none)."""
    return tuple([adapters] if isinstance(adapters, str) else adapters or [])


@torch.no_grad()
def prompt_losses(
    engine: Engine,
    ids_list: list[list[int]],
    adapters: str | list[str] | None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean next-token cross-entropy of each token list with `adapters` active: (N,)."""
    device = next(engine.model.parameters()).device
    out = []
    with engine.inference(adapters) as model:
        for start in range(0, len(ids_list), batch_size):
            chunk = [
                ids if len(ids) > 1 else ids * 2 for ids in ids_list[start : start + batch_size]
            ]
            ids, mask = (t.to(device) for t in pad(chunk, pad_id(engine.tokenizer)))
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            out.append(sequence_nll(logits, ids.masked_fill(mask == 0, -100), "mean").cpu())
    return torch.cat(out)
