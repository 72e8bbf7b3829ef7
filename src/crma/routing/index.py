"""The stored centroid router: per domain, its training texts' embeddings and statistics, saved
in the stack. Below `crma.continual`, which adds a domain's entry when it commits the domain."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from crma.errors import UserError, first_line
from crma.routing.embed import FrozenBase, embed
from crma.settings import setting
from crma.stack import DAMAGED, ROUTER_FILE

if TYPE_CHECKING:
    from crma.engine import Engine
    from crma.stack import Commit, Stack


@dataclass
class CentroidSettings:
    """What the stored centroid router embeds; fixed when a stack's router is created."""

    # Chosen on validation sets with the hard cases (spare passages, probe-like prompts, MMLU
    # questions no evaluation uses): scripts/tune_router.py; the scores are in
    # results/tuning/router.md.
    layer: int | None = setting(
        8, "hidden state embedded: 0 = token embeddings, at most the middle (None means it)"
    )
    max_length: int = setting(128, "tokens embedded per text (its start)")
    max_examples: int = setting(500, "training texts stored per domain (the first ones)")
    prefixes: list[int] = setting(
        [],
        "also store each training text's first N tokens, per N listed (texts longer than N), "
        "so short prompts meet examples of their length",
    )
    skip_first: bool = setting(
        True, "pool from the second token: the first one's state is an attention sink"
    )
    head: Literal["logistic", "prototype"] = setting(
        "logistic", "logistic (regression fitted on the stored embeddings) or prototype (cosine)"
    )
    l2: float = setting(0.01, "ridge penalty of the logistic head on standardised embeddings")


# What routers saved before a setting existed did: they load (and add domains) that way.
LEGACY_SETTINGS = {"prefixes": [], "skip_first": False}
# The serving router (`--router fast`), stored beside the main one over the same texts: the
# shallowest hidden state that keeps validation passages at the main rule's target, so routing
# a request costs a 30th of a prefill on the embedded model instead of 8 30ths
# (scripts/tune_router.py --serving; results/tuning/router-serving.md).
SERVING = CentroidSettings(layer=1, skip_first=True, l2=1e-4)
SERVING_PREFIX = "serving."  # its tensors' names in the router file
TENSORS = ("count", "sum", "sumsq", "embeddings", "labels")


class CentroidRouter:
    """Per domain: its training texts' embeddings (stored) and their count, sum and sum of squares
    (the prototypes and the pooled standardisation)."""

    def __init__(
        self, settings: CentroidSettings | None = None, serving: CentroidSettings | None = None
    ):
        self.settings = settings or CentroidSettings()
        # A second router over the same texts with `serving` settings, saved with this one.
        self.serving = CentroidRouter(serving) if serving else None
        self.domains: list[str] = []
        self.count = torch.zeros(0, dtype=torch.float64)  # (K,)
        self.sum = torch.zeros(0, 0, dtype=torch.float64)  # (K, d)
        self.sumsq = torch.zeros(0, 0, dtype=torch.float64)  # (K, d)
        self.embeddings = torch.zeros(0, 0, dtype=torch.float32)  # (N, d), the head's data
        self.labels = torch.zeros(0, dtype=torch.long)  # (N,), index into domains
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None  # fitted (W, b)
        self.route_examples: dict[str, int] = {}  # per domain, how many of its rows are those

    def add(self, domain: str, embeddings: torch.Tensor) -> None:
        """Set `domain`'s entry from its embeddings (N, d); others stay as they are."""
        e = embeddings.double()
        stats = (torch.tensor(float(len(e))), e.sum(0), (e * e).sum(0))
        if not self.domains:
            self.sum = self.sumsq = torch.zeros(0, e.shape[1], dtype=torch.float64)
            self.embeddings = torch.zeros(0, e.shape[1], dtype=torch.float32)
        if domain in self.domains:
            self.keep([d for d in self.domains if d != domain])
        self.domains.append(domain)
        self.route_examples.pop(domain, None)
        self.count = torch.cat([self.count, stats[0].view(1)])
        self.sum = torch.cat([self.sum, stats[1].view(1, -1)])
        self.sumsq = torch.cat([self.sumsq, stats[2].view(1, -1)])
        self.embeddings = torch.cat([self.embeddings, e.float()])
        self.labels = torch.cat([self.labels, torch.full((len(e),), len(self.domains) - 1)])
        self._head = None

    def embed(
        self, engine: Engine, ids_list: list[list[int]], base: FrozenBase | None = None
    ) -> torch.Tensor:
        """Texts embedded as this router's entries are, (N, d); `base` as in `embed`."""
        s = self.settings
        return embed(engine, ids_list, s.layer, s.max_length, skip_first=s.skip_first, base=base)

    def add_examples(
        self, engine: Engine, domain: str, examples: list[dict], route_examples: list[dict] = ()
    ) -> None:
        """Set `domain`'s entry from the embeddings of its first `max_examples` examples and of
        their `prefixes` (a prefix as long as its text would repeat it, so it is left out), and
        of every one of its `route_examples`: prompts in the style users send, stored for
        routing only (a domain's training texts may look nothing like its users' questions)."""
        s = self.settings
        ids = [e["input_ids"][: s.max_length] for e in examples[: s.max_examples]]
        ids += [x[:n] for n in s.prefixes for x in ids if len(x) > n]
        ids += [e["input_ids"][: s.max_length] for e in route_examples]
        self.add(domain, self.embed(engine, ids))
        if route_examples:
            self.route_examples[domain] = len(route_examples)
        if self.serving is not None:
            self.serving.add_examples(engine, domain, examples, route_examples)

    def keep(self, domains: list[str]) -> None:
        """Drop domains not in `domains` (one being replaced, or written by a commit that never
        finished); the order of the rest is kept."""
        rows = [i for i, d in enumerate(self.domains) if d in domains]
        remap = torch.full((len(self.domains),), -1)  # old domain index -> new, -1: dropped
        remap[rows] = torch.arange(len(rows))
        self.domains = [self.domains[i] for i in rows]
        self.route_examples = {d: n for d, n in self.route_examples.items() if d in self.domains}
        self.count, self.sum, self.sumsq = self.count[rows], self.sum[rows], self.sumsq[rows]
        if len(self.labels):
            new = remap[self.labels]
            self.embeddings, self.labels = self.embeddings[new >= 0], new[new >= 0]
        self._head = None
        if self.serving is not None:
            self.serving.keep(domains)

    @property
    def head(self) -> str:
        """The head in use: `logistic` needs stored embeddings of every domain (routers written
        before crma stored them have only the statistics, and use prototypes)."""
        complete = self.labels.unique().numel() == len(self.domains) > 0
        return "logistic" if self.settings.head == "logistic" and complete else "prototype"

    def _standardise(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(x − pooled mean) / pooled std, per dimension, over all domains' texts."""
        n = self.count.sum()
        mean = self.sum.sum(0) / n  # (d,)
        var = (self.sumsq.sum(0) / n - mean**2).clamp(min=0)
        return (embeddings.double() - mean) / (var + 1e-6 * var.mean() + 1e-12).sqrt()

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Higher = closer, (N, K): the head's log-probabilities, or cosines to the prototypes."""
        z = self._standardise(embeddings)  # (N, d)
        if self.head == "logistic":
            W, b = self._fitted_head()
            return torch.log_softmax(z @ W.T + b, dim=-1)
        protos = self._standardise(self.sum / self.count[:, None])  # (K, d)
        return (
            torch.nn.functional.normalize(z, dim=-1)
            @ torch.nn.functional.normalize(protos, dim=-1).T
        )

    def _fitted_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._head is None:
            self._head = fit_logistic(
                self._standardise(self.embeddings), self.labels, len(self.domains), self.settings.l2
            )
        return self._head

    # -- persistence --------------------------------------------------------------------------
    def save(self, commit: Commit) -> None:
        """Write the router into `commit` and describe it in its manifest."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).contiguous() for k in TENSORS}
        entry = {"kind": "centroid", "domains": list(self.domains)}
        if self.route_examples:
            entry["route_examples"] = dict(self.route_examples)
        if self.serving is not None:
            assert self.serving.domains == self.domains, "the serving router lags the main one"
            tensors |= {SERVING_PREFIX + k: getattr(self.serving, k).contiguous() for k in TENSORS}
            entry["serving"] = dataclasses.asdict(self.serving.settings)
        meta = {"domains": json.dumps(self.domains)}
        rel = commit.write(ROUTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        commit.manifest["router"] = {**entry, "file": rel, **dataclasses.asdict(self.settings)}

    @classmethod
    def load(cls, stack: Stack) -> CentroidRouter:
        """The stack's router, limited to the domains its manifest lists; empty if none yet
        (with a serving router then; one written before serving routers existed has none)."""
        from safetensors import safe_open

        entry = stack.manifest.get("router") or {}
        fields = [f.name for f in dataclasses.fields(CentroidSettings)]
        given = {k: entry[k] for k in fields if k in entry}
        serving = CentroidSettings(**entry["serving"]) if "serving" in entry else None
        router = cls(
            CentroidSettings(**{**LEGACY_SETTINGS, **given} if entry else given),
            serving if entry else SERVING,
        )
        for part in (router, router.serving):  # the serving router stores the same texts
            if part is not None:
                part.route_examples = dict(entry.get("route_examples", {}))
        path = stack.component("router")
        if path is None:
            return router
        try:
            with safe_open(str(path), framework="pt") as fh:
                names = set(fh.keys())
                for part, prefix in ((router, ""), (router.serving, SERVING_PREFIX)):
                    if part is None:
                        continue
                    part.domains = json.loads(fh.metadata()["domains"])
                    for name in TENSORS:
                        if prefix + name in names:
                            setattr(part, name, fh.get_tensor(prefix + name))
            router.keep(stack.domains)
        except Exception as exc:  # safetensors raises several kinds on damaged files
            raise UserError(
                f"{path}: cannot read the router ({first_line(exc)}); {DAMAGED}"
            ) from exc
        return router


def fit_logistic(
    z: torch.Tensor, labels: torch.Tensor, classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: mean cross-entropy + l2/2·‖W‖², by L-BFGS (convex, so
    the optimum does not depend on the start). z (N, d) → W (K, d), b (K,)."""
    W = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W.T + b, labels) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return W.detach(), b.detach()


def update_router(
    commit: Commit,
    engine: Engine,
    domain: str,
    examples: list[dict],
    route_examples: list[dict] = (),
) -> None:
    """Add `domain`'s entry from its training and routing examples (called when a domain is
    committed)."""
    router = CentroidRouter.load(commit.stack)
    router.add_examples(engine, domain, examples, route_examples)
    router.save(commit)
