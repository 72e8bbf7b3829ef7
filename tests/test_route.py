"""Routers on tiny distinct domains: centroid (stored, incremental), arrow, loss; metrics."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from stacks import build_stack, texts

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
    assert (path / "router.safetensors").is_file()
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
    router = Router(cm, RouteSettings(threshold=1.01))
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
