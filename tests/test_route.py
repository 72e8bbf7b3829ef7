"""Routers on tiny distinct domains: centroid (stored, incremental), arrow, loss; metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from helpers import committed
from stacks import build_stack, commit_router, texts

from crma.routing.index import SERVING, CentroidRouter
from crma.routing.metrics import plot_confusion, routing_metrics
from crma.routing.router import Router, RouteSettings

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
    from crma.routing.index import fit_logistic

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

    from crma.routing.router import refresh_router

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
    from crma.routing.index import CentroidSettings
    from crma.routing.router import refresh_router

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


def _hidden(engine, ids: list[int], layer: int) -> torch.Tensor:
    """Hidden state `layer` of one text from a plain forward pass of the frozen base, (T, d)."""
    with torch.no_grad(), engine.inference(None, backbone=False) as model:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0].double()


def test_skip_first_pools_from_the_second_token(stack):
    from crma.routing.embed import embed

    _, cm = stack
    ids = [[5, 9, 14, 3, 7], [11, 4], [8]]  # a one-token text keeps its only token
    pooled = embed(cm.engine, ids, layer=1, skip_first=True)
    for row, x in zip(pooled, ids):
        h = _hidden(cm.engine, x, 1)
        assert torch.allclose(row, h[1:].mean(0) if len(x) > 1 else h[0], atol=1e-5)
    plain = embed(cm.engine, ids[:1], layer=1)
    assert torch.allclose(plain[0], _hidden(cm.engine, ids[0], 1).mean(0), atol=1e-5)


def test_prefixes_store_the_start_of_each_longer_text(stack):
    from crma.routing.index import CentroidSettings

    _, cm = stack
    ids = [[5, 9, 14, 3, 7, 2], [11, 4, 6], [8, 12, 10, 13], [6, 5]]
    s = CentroidSettings(layer=1, max_examples=3, prefixes=[2, 3], skip_first=False)
    router = CentroidRouter(s)
    router.add_examples(cm.engine, "a", [{"input_ids": x} for x in ids])
    # the first 3 texts, then their 2-token starts (all three are longer), then their 3-token
    # starts (texts 0 and 2 only: text 1 has exactly 3 tokens)
    expected = [(0, 6), (1, 3), (2, 4), (0, 2), (1, 2), (2, 2), (0, 3), (2, 3)]
    assert len(router.embeddings) == len(expected) and router.count.tolist() == [8.0]
    for row, (i, n) in zip(router.embeddings, expected):
        # causal attention: a prefix's states are those of the whole text's first n tokens
        want = _hidden(cm.engine, ids[i], 1)[:n].mean(0)
        assert torch.allclose(row.double(), want, atol=1e-5), (i, n)


def test_decide_falls_back_under_the_threshold():
    from crma.routing.router import decide

    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]]).log()  # confidences at T = 1
    routes = decide(scores, ["a", "b"], temperature=1.0, threshold=0.6)
    assert [r.domain for r in routes] == ["a", None, "b"]
    assert [r.best for r in routes] == ["a", "a", "b"]
    assert [round(r.confidence, 6) for r in routes] == [0.75, 0.5, 0.9]
    # temperature 2 flattens 3:1 odds to sqrt(3):1, confidence 1.732/2.732 = 0.634
    assert round(decide(scores[:1], ["a", "b"], 2.0, 0.0)[0].confidence, 3) == 0.634


def test_router_saved_before_prefixes_and_skip_first_opens_as_it_was(tmp_path):
    """A manifest entry written before these settings existed means no prefixes and pooling
    over every token: the router loads so, routes, and a new domain is embedded the same way
    (one row per text) until refresh_router rebuilds it with today's settings."""
    from crma.data import tokenize_records
    from crma.routing.index import LEGACY_SETTINGS, CentroidSettings
    from crma.routing.router import refresh_router
    from crma.stack import Stack

    path = tmp_path / "stack"
    build_stack(path, DOMAINS[:2])
    manifest = json.loads((path / "manifest.json").read_text())
    for key in LEGACY_SETTINGS:
        del manifest["router"][key]
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = CentroidRouter.load(Stack.open(path))
    assert old.settings == CentroidSettings(
        **{**dataclasses.asdict(old.settings), **LEGACY_SETTINGS}
    )
    assert old.settings.prefixes == [] and old.settings.skip_first is False
    cm = build_stack(path, DOMAINS[2:])  # reopens the stack and adds a domain
    grown = CentroidRouter.load(cm.stack)
    assert grown.settings == old.settings
    assert (grown.labels == grown.domains.index("code")).sum() == 40  # no prefix rows
    assert routing_metrics(Router(cm), holdout_ids(cm))["top1"] == {d: 1.0 for d in DOMAINS}
    examples = {
        d: tokenize_records([{"text": t} for t in texts(d, 40, seed=0)], cm.engine.tokenizer, 32)
        for d in DOMAINS
    }
    assert refresh_router(cm, examples)
    assert CentroidRouter.load(cm.stack).settings == CentroidSettings()


def test_fast_router_is_stored_beside_the_main_one_with_the_serving_settings(stack):
    from crma.data import tokenize_records

    path, cm = stack
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["router"]["serving"] == dataclasses.asdict(SERVING)
    stored = CentroidRouter.load(cm.stack).serving
    assert stored is not None and stored.domains == DOMAINS
    by_hand = CentroidRouter(SERVING)  # from what build_stack trained on
    for d in DOMAINS:
        records = [{"text": t} for t in texts(d, 40, seed=0)]
        by_hand.add_examples(cm.engine, d, tokenize_records(records, cm.engine.tokenizer, 32))
    assert torch.allclose(stored.embeddings, by_hand.embeddings, rtol=0, atol=1e-6)
    assert torch.equal(stored.labels, by_hand.labels)
    ids = holdout_ids(cm)
    every = [x for d in DOMAINS for x in ids[d]]
    fast = Router(cm, RouteSettings(router="fast"))
    want = by_hand.scores(by_hand.embed(cm.engine, every))
    assert torch.allclose(fast.scores(every), want, rtol=0, atol=1e-6)
    # another router than the main one (its L2 penalty, on the tiny model the same layer)
    assert not torch.allclose(fast.scores(every), Router(cm).scores(every), rtol=0, atol=1e-3)
    assert routing_metrics(fast, ids)["top1"] == {d: 1.0 for d in DOMAINS}


def test_route_examples_are_stored_whole_after_the_training_rows_in_both_routers(stack):
    from crma.routing.index import CentroidSettings

    _, cm = stack
    ids = [[5, 9, 14, 3, 7, 2], [11, 4, 6], [8, 12, 10, 13]]
    asked = [[7, 7, 3, 9, 4], [2, 6, 5]]
    s = CentroidSettings(layer=1, max_examples=2, prefixes=[2], skip_first=False)
    router = CentroidRouter(s, serving=dataclasses.replace(s, skip_first=True))
    router.add_examples(
        cm.engine, "a", [{"input_ids": x} for x in ids], [{"input_ids": x} for x in asked]
    )
    # 2 training texts (max_examples), their 2-token starts, then every route example whole
    expected = [ids[0], ids[1], ids[0][:2], ids[1][:2], *asked]
    for part, skip in ((router, 0), (router.serving, 1)):
        assert len(part.embeddings) == len(expected) and part.count.tolist() == [len(expected)]
        for row, x in zip(part.embeddings, expected):
            want = _hidden(cm.engine, x, 1)[skip:].mean(0)
            assert torch.allclose(row.double(), want, atol=1e-5)


def test_router_is_rebuilt_when_the_route_examples_asked_for_change(tmp_path):
    from crma.data import tokenize_records
    from crma.routing.router import refresh_router

    path = tmp_path / "stack"
    cm = build_stack(path, DOMAINS)
    tok = cm.engine.tokenizer
    examples = {
        d: tokenize_records([{"text": t} for t in texts(d, 40, seed=0)], tok, 32) for d in DOMAINS
    }
    asked = {"money": [{"input_ids": tok(t)["input_ids"]} for t in texts("medic", 6, seed=5)]}
    assert not refresh_router(cm, examples)  # built from the same texts, no route examples
    assert refresh_router(cm, examples, asked)
    stored = CentroidRouter.load(cm.stack)
    assert stored.route_examples == {"money": 6} and stored.serving.route_examples == {"money": 6}
    assert json.loads((path / "manifest.json").read_text())["router"]["route_examples"] == {
        "money": 6
    }
    assert not refresh_router(cm, examples, asked)
    assert refresh_router(cm, examples, {"money": asked["money"][:3]})
    assert refresh_router(cm, examples)  # back to none
    assert CentroidRouter.load(cm.stack).route_examples == {}


def test_route_questions_are_unscored_and_disjoint_from_router_validation():
    from crma.data import DOMAINS as CORPUS
    from crma.data import corpus_file
    from crma.eval.qa import MMLU_SCORED, read_items, spread, unscored_questions

    for domain in CORPUS:
        mmlu = read_items(corpus_file(domain, "mmlu"))
        stored, validation = (unscored_questions(mmlu, part) for part in (0, 1))
        ids = [{i["id"] for i in part} for part in (stored, validation, spread(mmlu, MMLU_SCORED))]
        assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
        assert len(stored) + len(validation) + MMLU_SCORED == len(mmlu)
        assert not ids[0] & {i["id"] for i in spread(mmlu, 50)}  # QA at 50 too (a divisor)


def test_a_run_refuses_route_questions_its_qa_would_score():
    from helpers import TINY_BASE
    from transformers import AutoTokenizer

    from crma.errors import UserError
    from crma.protocol.config import RunConfig
    from crma.protocol.data import route_questions

    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    config = RunConfig()
    config.eval.qa, config.eval.route_questions = True, 40
    assert len(route_questions("code", config, tok)) == 40
    config.eval.qa_mmlu = 299  # spread over 299 is not inside the 300 route questions avoid
    with pytest.raises(UserError, match="eval.route_questions: .* eval.qa_mmlu=299 scores"):
        route_questions("financial", config, tok)
