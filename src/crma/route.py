"""Routing: which domain's adapter should answer a prompt (DESIGN §2, issue 6).

Three routers, each returning a domain and a confidence per prompt:

- `centroid` (default, stored in the stack): the frozen base's mean-pooled hidden states of a
  domain's training texts (pooled from the second token on, the first being an attention sink;
  optionally also of each text's first N tokens, `prefixes`), standardised with the pooled statistics of all domains (a few outlier
  dimensions of LLM hidden states would otherwise decide every distance). Its `head` scores a
  prompt: `logistic` (default), a small L2-regularised multinomial logistic regression fitted on
  the stored embeddings when the router is loaded (convex, so the fit is deterministic), or
  `prototype`, the cosine to each domain's mean. Adding a domain stores its embeddings and
  leaves earlier domains' entries, and every adapter, as they are.
- `arrow` (data-free, Ostapenko et al. 2024): the top right-singular vector of each adapter's
  B·A per adapted module; a prompt scores |cos(h, v)| averaged over tokens and modules, h being
  the module's input. Works on adapters imported from elsewhere.
- `loss`: the domain whose adapters give the prompt the lowest loss; an expensive upper bound.

Below `threshold` confidence, a route falls back to no adapter (base + CRMA backbone).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from crma.errors import UserError, first_line
from crma.fileio import atomic_path
from crma.settings import Settings, setting
from crma.stack import DAMAGED, ROUTER_FILE

if TYPE_CHECKING:
    from crma.continual import ContinualModel
    from crma.engine import Engine
    from crma.stack import Commit, Stack

ROUTERS = ("centroid", "arrow", "loss")
FALLBACK = "none"  # label of "no adapter" in confusion matrices
# Softmax temperatures that turn scores into confidences; the logistic head's scores are
# already log-probabilities.
DEFAULT_TEMPERATURE = {"prototype": 0.05, "logistic": 1.0, "arrow": 0.01, "loss": 0.1}


@dataclass
class RouteSettings(Settings):
    """How prompts are routed to a domain's adapter."""

    router: Literal["centroid", "arrow", "loss"] = setting(
        "centroid", "centroid (stored prototypes), arrow (from adapter weights), loss (slow bound)"
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
class CentroidSettings:
    """What the stored centroid router embeds; fixed when a stack's router is created."""

    # Chosen on validation (scripts/tune_router.py, results/tuning/router.md): passages, probe-like
    # prompts and MMLU questions that no evaluation uses. Hidden state 8 of 30 routes those
    # questions best (mean top-1 60 % over the domains; the best at hidden state 4: 50 %, the
    # previous default 48 %), for 8/30 of a forward pass over the prompt.
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


@dataclass
class Route:
    """Where one prompt goes: `domain` None means no adapter (confidence under threshold)."""

    domain: str | None
    confidence: float
    best: str  # the top-scoring domain, also when falling back
    scores: dict[str, float] = field(default_factory=dict)


# -- hidden states of the frozen base -----------------------------------------------------------
class _Stop(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest is not needed."""


@contextmanager
def frozen_base(engine: Engine) -> Iterator[None]:
    """The base model alone: no adapter, CRMA backbone off, eval mode (no dropout)."""
    model = engine.model
    was_training, backbone = model.training, engine.backbone
    enabled = backbone.enabled if backbone is not None else None
    model.eval()
    try:
        if backbone is not None:
            backbone.enabled = False
        with engine.using(None):
            yield
    finally:
        if backbone is not None:
            backbone.enabled = enabled
        model.train(was_training)


def _pad(ids_list: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, both (B, T)."""
    width = max(len(ids) for ids in ids_list)
    ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), width), dtype=torch.long)
    for row, seq in enumerate(ids_list):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.no_grad()
def embed(
    engine: Engine,
    ids_list: list[list[int]],
    layer: int | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    skip_first: bool = False,
) -> torch.Tensor:
    """Mean-pooled hidden state `layer` of the frozen base per text, (N, d) float64; with
    `skip_first`, pooled from the second token on (a one-token text keeps its token).

    Layers after `layer` are skipped (a hook stops the forward pass there).
    """
    from crma.adapter import decoder_layers

    layers = decoder_layers(engine.model)
    n = len(layers)
    index = n // 2 if layer is None else (min(layer, n // 2) if layer >= 0 else layer % (n + 1))
    device = next(engine.model.parameters()).device
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    target = engine.base.get_input_embeddings() if index == 0 else layers[index - 1]
    handle = target.register_forward_hook(grab)
    out = []
    try:
        with frozen_base(engine):
            for start in range(0, len(ids_list), batch_size):
                chunk = [
                    ids[:max_length] or [pad_id(engine.tokenizer)]
                    for ids in ids_list[start : start + batch_size]
                ]
                ids, mask = _pad(chunk, pad_id(engine.tokenizer), device)
                captured.clear()
                with suppress(_Stop):
                    engine.model(input_ids=ids, attention_mask=mask)
                h = captured[0].double()  # (B, T, d)
                m = mask.unsqueeze(-1).double()  # (B, T, 1)
                if skip_first:
                    m[:, 0] = (mask.sum(1, keepdim=True) == 1).double()
                out.append(((h * m).sum(1) / m.sum(1)).cpu())  # (B, d)
    finally:
        handle.remove()
    return torch.cat(out)


# -- the stored centroid router -----------------------------------------------------------------
class CentroidRouter:
    """Per domain: its training texts' embeddings (stored) and their count, sum and sum of squares
    (the prototypes and the pooled standardisation)."""

    def __init__(self, settings: CentroidSettings | None = None):
        self.settings = settings or CentroidSettings()
        self.domains: list[str] = []
        self.count = torch.zeros(0, dtype=torch.float64)  # (K,)
        self.sum = torch.zeros(0, 0, dtype=torch.float64)  # (K, d)
        self.sumsq = torch.zeros(0, 0, dtype=torch.float64)  # (K, d)
        self.embeddings = torch.zeros(0, 0, dtype=torch.float32)  # (N, d), the head's data
        self.labels = torch.zeros(0, dtype=torch.long)  # (N,), index into domains
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None  # fitted (W, b)

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
        self.count = torch.cat([self.count, stats[0].view(1)])
        self.sum = torch.cat([self.sum, stats[1].view(1, -1)])
        self.sumsq = torch.cat([self.sumsq, stats[2].view(1, -1)])
        self.embeddings = torch.cat([self.embeddings, e.float()])
        self.labels = torch.cat([self.labels, torch.full((len(e),), len(self.domains) - 1)])
        self._head = None

    def embed(self, engine: Engine, ids_list: list[list[int]]) -> torch.Tensor:
        """Texts embedded as this router's entries are, (N, d)."""
        s = self.settings
        return embed(engine, ids_list, s.layer, s.max_length, skip_first=s.skip_first)

    def add_examples(self, engine: Engine, domain: str, examples: list[dict]) -> None:
        """Set `domain`'s entry from the embeddings of its first `max_examples` examples and of
        their `prefixes` (a prefix as long as its text would repeat it, so it is left out)."""
        s = self.settings
        ids = [e["input_ids"][: s.max_length] for e in examples[: s.max_examples]]
        ids += [x[:n] for n in s.prefixes for x in ids if len(x) > n]
        self.add(domain, self.embed(engine, ids))

    def keep(self, domains: list[str]) -> None:
        """Drop domains not in `domains` (one being replaced, or written by a commit that never
        finished); the order of the rest is kept."""
        rows = [i for i, d in enumerate(self.domains) if d in domains]
        remap = torch.full((len(self.domains),), -1)  # old domain index -> new, -1: dropped
        remap[rows] = torch.arange(len(rows))
        self.domains = [self.domains[i] for i in rows]
        self.count, self.sum, self.sumsq = self.count[rows], self.sum[rows], self.sumsq[rows]
        if len(self.labels):
            new = remap[self.labels]
            self.embeddings, self.labels = self.embeddings[new >= 0], new[new >= 0]
        self._head = None

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

        tensors = {
            "count": self.count,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "embeddings": self.embeddings,
            "labels": self.labels,
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {"domains": json.dumps(self.domains)}
        rel = commit.write(ROUTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        commit.manifest["router"] = {
            "kind": "centroid",
            "file": rel,
            "domains": list(self.domains),
            **dataclasses.asdict(self.settings),
        }

    @classmethod
    def load(cls, stack: Stack) -> CentroidRouter:
        """The stack's router, limited to the domains its manifest lists; empty if none yet."""
        from safetensors import safe_open

        entry = stack.manifest.get("router") or {}
        fields = [f.name for f in dataclasses.fields(CentroidSettings)]
        given = {k: entry[k] for k in fields if k in entry}
        router = cls(CentroidSettings(**{**LEGACY_SETTINGS, **given} if entry else given))
        path = stack.component("router")
        if path is None:
            return router
        try:
            with safe_open(str(path), framework="pt") as fh:
                router.domains = json.loads(fh.metadata()["domains"])
                names = set(fh.keys())
                for name in ("count", "sum", "sumsq", "embeddings", "labels"):
                    if name in names:
                        setattr(router, name, fh.get_tensor(name))
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


def update_router(commit: Commit, engine: Engine, domain: str, examples: list[dict]) -> None:
    """Add `domain`'s entry from its training examples (called when a domain is committed)."""
    router = CentroidRouter.load(commit.stack)
    router.add_examples(engine, domain, examples)
    router.save(commit)


def refresh_router(cm: ContinualModel, examples: dict[str, list[dict]]) -> bool:
    """Rebuild a router that is not what this crma would store (one written before routers
    stored embeddings, or with other settings than today's defaults) from each domain's
    training `examples`, so a protocol run measures the current router; True if rebuilt."""
    old = CentroidRouter.load(cm.stack)
    current = old.settings == CentroidSettings() and old.head == old.settings.head
    if current and set(old.domains) == set(cm.stack.domains):
        return False
    router = CentroidRouter()
    for domain in cm.stack.domains:
        router.add_examples(cm.engine, domain, examples[domain])
    with cm.writing():
        commit = cm.stack.begin_commit()
        router.save(commit)
        commit.finish()
    return True


# -- routing --------------------------------------------------------------------------------------
class Router:
    """Routes token ids or texts of a stack opened as a ContinualModel."""

    def __init__(self, cm: ContinualModel, settings: RouteSettings | None = None):
        self.cm, self.settings = cm, settings or RouteSettings()
        self.domains = list(cm.stack.domains)
        self._centroid: CentroidRouter | None = None
        self._arrow: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def temperature(self) -> float:
        kind = self.settings.router
        return (
            self.settings.confidence_temperature
            or DEFAULT_TEMPERATURE[self.centroid.head if kind == "centroid" else kind]
        )

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
        if kind == "centroid":
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

    def _centroid_scores(self, ids_list: list[list[int]]) -> torch.Tensor:
        c = self.centroid
        if len(c.domains) == 1:
            return torch.zeros(len(ids_list), 1, dtype=torch.float64)
        scores = c.scores(c.embed(self.cm.engine, ids_list))
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


# -- arrow -------------------------------------------------------------------------------------------
def arrow_vectors(
    engine: Engine, domains: list[str], adapter_name
) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain, per adapted module: the top right-singular vector of B·A, (d_in,)."""
    from crma.methods.layouts import lora_matrices

    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for domain in domains:
            adapter = adapter_name(domain)
            A = lora_matrices(engine, adapter, "lora_A")  # module -> (r, d_in)
            if not A:
                raise UserError(
                    f"adapter {adapter!r} has no LoRA matrices; arrow routing needs LoRA adapters "
                    "(use --router centroid)"
                )
            B = lora_matrices(engine, adapter, "lora_B")  # module -> (d_out, r)
            vectors = {}
            for module, a in A.items():
                _, r_b = torch.linalg.qr(B[module].double())  # B = Q·R_b, so B·A ~ R_b·A
                _, _, vh = torch.linalg.svd(r_b @ a.double(), full_matrices=False)
                vectors[module] = vh[0]  # (d_in,)
            out[domain] = vectors
    return out


@torch.no_grad()
def arrow_scores(
    engine: Engine,
    vectors: dict[str, dict[str, torch.Tensor]],
    ids_list: list[list[int]],
    domains: list[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean over tokens and modules of |cos(x, v_domain,module)|, x the module's input: (N, K)."""
    modules = sorted(next(iter(vectors.values())))
    captured: dict[str, torch.Tensor] = {}
    handles = [
        engine.model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, args, m=m: captured.__setitem__(m, args[0])
        )
        for m in modules
    ]
    device = next(engine.model.parameters()).device
    rows = []
    try:
        for start in range(0, len(ids_list), batch_size):
            ids, mask = _pad(ids_list[start : start + batch_size], pad_id(engine.tokenizer), device)
            model = engine.model
            was_training = model.training
            model.eval()
            with engine.using(None):
                model(input_ids=ids, attention_mask=mask)
            model.train(was_training)
            m = mask.double()  # (B, T)
            score = torch.zeros(len(ids), len(domains), dtype=torch.float64)
            for name in modules:
                x = torch.nn.functional.normalize(captured[name].double(), dim=-1)  # (B, T, d_in)
                V = torch.stack([vectors[d][name] for d in domains], dim=1).to(x)  # (d_in, K)
                cos = (x @ V).abs()  # (B, T, K)
                score += ((cos * m[..., None]).sum(1) / m.sum(1, keepdim=True)).cpu()
            rows.append(score / len(modules))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows)


# -- loss --------------------------------------------------------------------------------------------
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
    model = engine.model
    was_training = model.training
    model.eval()
    with engine.using(adapters):
        for start in range(0, len(ids_list), batch_size):
            chunk = [
                ids if len(ids) > 1 else ids * 2 for ids in ids_list[start : start + batch_size]
            ]
            ids, mask = _pad(chunk, pad_id(engine.tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), ids[:, 1:], reduction="none"
            )  # (B, T-1)
            m = mask[:, 1:].float()
            out.append(((nll * m).sum(1) / m.sum(1)).cpu())
    model.train(was_training)
    return torch.cat(out)


# -- routing metrics ---------------------------------------------------------------------------------
def routing_metrics(router: Router, holdouts: dict[str, list[list[int]]]) -> dict[str, Any]:
    """Top-1 accuracy per domain on its holdout texts and the confusion matrix.

    `confusion[i][j]`: texts of domain i routed to label j; labels = domains + ["none"]
    (fallback to no adapter).
    """
    labels = [*router.domains, FALLBACK]
    confusion, top1, routes_by_domain = [], {}, {}
    for domain, ids_list in holdouts.items():
        routes = router.route_ids(ids_list)
        row = [0] * len(labels)
        for r in routes:
            row[labels.index(r.domain or FALLBACK)] += 1
        confusion.append(row)
        top1[domain] = row[labels.index(domain)] / len(routes) if domain in labels else 0.0
        routes_by_domain[domain] = [r.domain for r in routes]
    kind = router.settings.router
    return {
        "router": kind,
        **({"head": router.centroid.head} if kind == "centroid" else {}),
        "threshold": router.settings.threshold,
        "domains": list(holdouts),
        "labels": labels,
        "top1": top1,
        "top1_mean": sum(top1.values()) / max(1, len(top1)),
        "confusion": confusion,
        "routes": routes_by_domain,
    }


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true domain × routed label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[v / max(1, sum(r)) for v in r] for r in metrics["confusion"]]
    labels, domains = metrics["labels"], metrics["domains"]
    fig, ax = plt.subplots(figsize=(1.0 * len(labels) + 2, 0.8 * len(domains) + 1.5))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(metrics["confusion"]):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rows[i][j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel("routed to")
    ax.set_ylabel("holdout of")
    ax.set_title(title or f"router: {metrics['router']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
