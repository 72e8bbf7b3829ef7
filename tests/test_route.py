"""Routers on tiny distinct domains: centroid (stored, incremental), arrow, loss; metrics."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import committed
from stacks import build_stack, commit_router, texts

from crma.route import CentroidRouter, Router, RouteSettings, plot_confusion, routing_metrics

DOMAINS = ["medic", "money", "code"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("route") / "stack"
    return path, build_stack(path, DOMAINS)


def holdout_ids(cm, n=10):
    tok = cm.engine.tokenizer
    return {d: [tok(t)["input_ids"] for t in texts(d, n, seed=1)] for d in DOMAINS}


def test_centroid_routes_holdouts_and_reloads_from_disk(stack):
    path, cm = stack
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["router"]["kind"] == "centroid" and manifest["router"]["domains"] == DOMAINS
    assert committed(path, "router").is_file()
    metrics = routing_metrics(Router(cm), holdout_ids(cm))
    assert metrics["top1"] == {d: 1.0 for d in DOMAINS}, metrics["confusion"]
    assert [sum(row) for row in metrics["confusion"]] == [10, 10, 10]

    from crma.generate import load_stack

    reopened = load_stack(path)  # a fresh process's view: everything comes from the stack
    again = routing_metrics(reopened.router, holdout_ids(cm))
    assert again["routes"] == metrics["routes"]


def test_adding_a_domain_updates_router_and_leaves_earlier_adapters(tmp_path):
    path = tmp_path / "stack"
    cm = build_stack(path, DOMAINS[:2])
    files = {d: path / "adapters" / d / "adapter_model.safetensors" for d in DOMAINS[:2]}
    before = {d: hashlib.sha256(f.read_bytes()).hexdigest() for d, f in files.items()}
    old = CentroidRouter.load(cm.stack)
    build_stack(path, [DOMAINS[2]])  # reopens the stack and adds one domain
    after = {d: hashlib.sha256(f.read_bytes()).hexdigest() for d, f in files.items()}
    assert after == before
    from crma.stack import Stack

    new = CentroidRouter.load(Stack.open(path))
    assert new.domains == DOMAINS
    assert torch.equal(new.sum[:2], old.sum) and torch.equal(new.count[:2], old.count)
    from crma.generate import load_stack

    routes = load_stack(path).route(texts("code", 5, seed=3))
    assert [r.domain for r in routes] == ["code"] * 5


@pytest.mark.parametrize("kind", ["arrow", "loss"])
def test_arrow_and_loss_routers_pick_valid_and_mostly_right_domains(stack, kind):
    _, cm = stack
    metrics = routing_metrics(Router(cm, RouteSettings(router=kind)), holdout_ids(cm))
    routed = {d for rs in metrics["routes"].values() for d in rs}
    assert routed <= set(DOMAINS)
    assert metrics["top1_mean"] >= 0.8, metrics["confusion"]


def test_threshold_falls_back_to_no_adapter(stack, tmp_path):
    _, cm = stack
    router = Router(cm, RouteSettings(threshold=0.99, confidence_temperature=100.0))
    routes = router.route_texts(texts("medic", 3, seed=1))
    assert all(r.domain is None and r.best == "medic" for r in routes)
    assert router.adapters_for(routes[0]) is None
    metrics = routing_metrics(router, holdout_ids(cm, 3))
    assert [row[-1] for row in metrics["confusion"]] == [3, 3, 3]  # all in the "none" column
    plot_confusion(metrics, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_router_state_leaves_model_as_it_was(stack):
    _, cm = stack
    engine = cm.engine
    engine.model.train()
    Router(cm).route_texts(["heart blood fever"])
    assert engine.model.training and engine.backbone.enabled


def test_logistic_head_is_the_regularised_optimum():
    """Independent check of the fit: at the optimum of mean CE + l2/2·‖W‖² the gradient,
    Zᵀ(P − Y)/N + l2·W for W and mean(P − Y) for b, vanishes."""
    from crma.route import fit_logistic

    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    z[:, 0] += labels  # separable-ish along one axis
    W, b = fit_logistic(z, labels, 3, l2=0.1)
    P = torch.softmax(z @ W.T + b, dim=-1)
    Y = torch.nn.functional.one_hot(labels, 3).double()
    assert torch.allclose((P - Y).T @ z / 60 + 0.1 * W, torch.zeros_like(W), atol=1e-6)
    assert torch.allclose((P - Y).mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert (P.argmax(-1) == labels).double().mean() > 0.6


def test_replacing_a_domain_keeps_the_other_domains_rows():
    e = {
        d: torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        for i, d in enumerate("abc")
    }
    router = CentroidRouter()
    for d in "abc":
        router.add(d, e[d])
    router.add("a", e["a"] + 1)  # replaced: moves to the end, the others keep their embeddings
    assert router.domains == ["b", "c", "a"]
    for k, d in enumerate(router.domains):
        rows = router.embeddings[router.labels == k]
        assert torch.equal(rows, e[d] + (d == "a")), d
    assert torch.allclose(router.sum[2], (e["a"] + 1).double().sum(0))


def test_router_without_stored_embeddings_is_rebuilt(tmp_path):
    """Stacks written before the logistic head hold only count/sum/sumsq: they route with
    prototypes until refresh_router rebuilds them from the training examples."""
    from safetensors.torch import load_file

    from crma.route import refresh_router

    path = tmp_path / "stack"
    cm = build_stack(path, DOMAINS)
    tensors = load_file(str(committed(path, "router")))
    old = CentroidRouter()
    old.domains = list(DOMAINS)
    old.count, old.sum, old.sumsq = (tensors[k] for k in ("count", "sum", "sumsq"))
    commit_router(cm, old)
    assert Router(cm).centroid.head == "prototype"
    from crma.data import tokenize_records

    examples = {  # what build_stack trained on
        d: tokenize_records([{"text": t} for t in texts(d, 40, seed=0)], cm.engine.tokenizer, 32)
        for d in DOMAINS
    }
    assert refresh_router(cm, examples)
    rebuilt = CentroidRouter.load(cm.stack)
    assert rebuilt.head == "logistic" and torch.equal(rebuilt.labels.unique(), torch.arange(3))
    assert torch.allclose(rebuilt.sum, tensors["sum"])  # same texts, same statistics
    assert not refresh_router(cm, examples)  # already current
    assert routing_metrics(Router(cm), holdout_ids(cm))["top1"] == {d: 1.0 for d in DOMAINS}


def test_router_with_older_default_settings_is_rebuilt_with_todays(tmp_path):
    from crma.data import tokenize_records
    from crma.route import CentroidSettings, refresh_router

    path = tmp_path / "stack"
    cm = build_stack(path, DOMAINS)
    examples = {
        d: tokenize_records([{"text": t} for t in texts(d, 40, seed=0)], cm.engine.tokenizer, 32)
        for d in DOMAINS
    }
    older = CentroidRouter(CentroidSettings(layer=1, l2=0.5))
    for d in DOMAINS:
        older.add_examples(cm.engine, d, examples[d])
    commit_router(cm, older)
    assert CentroidRouter.load(cm.stack).settings.layer == 1
    assert refresh_router(cm, examples)
    assert CentroidRouter.load(cm.stack).settings == CentroidSettings()
    assert not refresh_router(cm, examples)


def test_stats_only_router_given_a_new_domain_keeps_prototypes():
    """An old router (statistics only) that gains a domain with embeddings must not fit a
    logistic head on that one domain's rows: it stays on prototypes until rebuilt."""
    router = CentroidRouter()
    g = torch.Generator().manual_seed(0)
    for d in "ab":
        router.add(d, torch.randn(4, 6, generator=g))
    router.embeddings, router.labels = router.embeddings[:0], router.labels[:0]  # as loaded
    router.add("c", torch.randn(4, 6, generator=g))
    assert router.head == "prototype"
    router.keep(["a", "c"])
    assert router.domains == ["a", "c"] and router.labels.tolist() == [1] * 4
