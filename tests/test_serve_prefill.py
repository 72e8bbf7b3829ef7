"""`crma serve` prefill: requests joining together share one forward pass and the chat
template's cached head, and compute what each would alone."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import pytest
import torch
from stacks import build_stack, texts
from transformers import DynamicCache

from crma.generate import BASE
from crma.serve.batcher import Batcher, Request
from crma.serve.config import ServeSettings
from crma.serve.prefill import groups, prefill
from crma.serve.sampling import Sampling
from crma.serve.snapshot import Snapshot

DOMAINS = ["medic", "money", "code"]


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    from crma.generate import load_stack

    path = tmp_path_factory.mktemp("prefill") / "stack"
    build_stack(path, DOMAINS)
    snapshot = Snapshot(load_stack(path), ServeSettings())
    with torch.no_grad():  # sharp attention: wrong positions or unmasked padding would show
        for name, param in snapshot.engine.base.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and "lora" not in name:
                param.mul_(6.0)
    return snapshot


def _chat(snap: Snapshot, text: str) -> list[int]:
    return snap.model.encode([{"role": "user", "content": text}])


def _alone(snap: Snapshot, ids: list[int], adapters) -> tuple[torch.Tensor, DynamicCache]:
    """Last logits and cache of one prompt in one plain forward pass, no head cache."""
    cache = DynamicCache(config=snap.engine.base.config)
    with torch.no_grad():
        logits = snap.logits(
            torch.tensor([ids]), None, torch.arange(len(ids))[None], cache, [adapters]
        )
    return logits[0], cache


def test_template_head_is_the_chat_template_up_to_the_users_text(snap):
    tok = snap.model.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "QQQ"}], add_generation_prompt=True, tokenize=False
    )
    assert snap.head.ids and tok.decode(snap.head.ids) == rendered.split("QQQ")[0]
    ids = _chat(snap, "heart blood")
    assert snap.head.length(ids) == len(snap.head.ids)
    assert snap.head.length(snap.model.encode("heart blood", chat_template=False)) == 0
    assert snap.head.length(snap.head.ids) == 0  # nothing would be left to prefill


def test_prefill_from_the_cached_head_equals_a_full_prefill(snap):
    ids = _chat(snap, texts("medic", 1, 3)[0])
    adapters = snap.adapters("medic")
    want, full = _alone(snap, ids, adapters)
    with torch.no_grad():
        cache, mask, logits = prefill(snap, snap.head, [ids], [adapters])
    assert mask.tolist() == [[1] * len(ids)]
    assert torch.allclose(logits[0], want, atol=1e-5)
    for got, ref in zip(cache.layers, full.layers):
        assert torch.allclose(got.keys, ref.keys, atol=1e-5)
        assert torch.allclose(got.values, ref.values, atol=1e-5)
    # the head's values differ per adapter (LoRA on v_proj): each adapter has its own
    assert not torch.allclose(snap.head.kv(adapters)[0][1], snap.head.kv(None)[0][1], atol=1e-4)


def test_batched_prefill_equals_one_by_one(snap):
    prompts = [_chat(snap, t) for t in texts("medic", 2, 4) + texts("code", 2, 5)]
    prompts.append(_chat(snap, "bond"))  # a short one: much left padding in its row
    adapters = [snap.adapters(d) for d in ("medic", None, "code", "money", "medic")]
    with torch.no_grad():
        cache, mask, logits = prefill(snap, snap.head, prompts, adapters)
    assert mask.shape == (5, max(len(p) for p in prompts))
    assert mask.sum(1).tolist() == [len(p) for p in prompts]
    for row, (ids, a) in enumerate(zip(prompts, adapters)):
        want, _ = _alone(snap, ids, a)
        assert torch.allclose(logits[row], want, atol=1e-5), row
        assert logits[row].argmax() == want.argmax()


def test_joining_chat_requests_decode_alone_and_together_token_for_token(snap):
    specs = [
        ("medic", texts("medic", 1, 6)[0], 12),
        ("base", "bond", 9),
        ("code", texts("code", 1, 7)[0] + " " + texts("code", 1, 8)[0], 10),
        ("money", texts("money", 1, 9)[0], 11),
    ]
    alone = [_decode(snap, [spec])[0] for spec in specs]
    together = _decode(snap, specs)  # queued before the model: admitted and prefilled at once
    assert together == alone
    assert all(tokens for tokens, _ in alone)


def _decode(snap: Snapshot, specs: list[tuple]) -> list[tuple[str, str]]:
    """(text, finish reason) of each chat request (model, prompt, max_tokens), greedy."""
    done = [threading.Event() for _ in specs]
    answers: list[tuple[str, str]] = [("", "")] * len(specs)
    batcher = Batcher(ServeSettings())

    def request(i: int, model: str, prompt: str, max_tokens: int) -> Request:
        def emit(event):
            if event[0] == "done":
                answers[i] = (event[4], event[2])
            if event[0] in ("done", "error"):
                done[i].set()

        messages = [{"role": "user", "content": prompt}]
        return Request(messages, prompt, model, True, Sampling(max_tokens, 0.0), 1, emit, 1e12)

    for i, spec in enumerate(specs):
        batcher.submit(request(i, *spec))
    batcher.swap(snap)
    assert all(d.wait(60) for d in done)
    batcher.close()
    return answers


def test_groups_split_by_head_and_by_padding():
    lengths = [10, 11, 30, 31, 12]
    # sorted 10, 11, 12: padding to 12 costs 36 ≤ 1.15 × 33 tokens; 30 would cost 120 > 72.45
    assert groups(lengths, lambda i: 0) == [[0, 1, 4], [2, 3]]
    # rows with and without the head never share a forward pass
    assert groups([10, 10, 10], lambda i: 4 if i != 1 else 0) == [[0, 2], [1]]
    assert groups([10, 40], lambda i: 0, slack=10.0) == [[0, 1]]


def test_row_adapters_hooks_compute_what_pefts_adapter_names_does(snap):
    assert snap.rows is not None
    engine = snap.engine
    ids = torch.tensor([_chat(snap, "heart fever")[-6:]] * 4)
    adapters = [snap.adapters(d) for d in ("medic", None, "code", "medic")]
    names = [a or BASE for a in adapters]
    with torch.no_grad():
        ours = snap.logits(ids, None, None, None, adapters)
        peft = engine.model(input_ids=ids, adapter_names=names, logits_to_keep=1).logits[:, -1]
        plain = engine.model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # active adapter
    assert torch.equal(ours, peft)
    assert not torch.allclose(ours[1], plain[1], atol=1e-4)  # row 1 has no adapter


def test_routing_embeds_through_the_row_hooks_what_the_engine_embeds(snap, monkeypatch):
    router = snap.model.router
    centroid = router.centroid
    tok = snap.model.tokenizer
    prompts = texts("medic", 3, 7) + texts("code", 2, 8) + ["bond"]  # "bond": much padding
    ids = [tok(t)["input_ids"] for t in prompts]
    backbone = snap.engine.backbone
    with torch.no_grad():  # a 20× stronger backbone, so that leaving it on would show
        backbone.log_alpha.add_(math.log(20))
    try:
        engine_way = centroid.embed(snap.engine, ids)  # Engine.inference: PEFT toggles adapters

        def refuse(*_args, **_kwargs):
            raise AssertionError("the server's routing toggled PEFT's adapters")

        with monkeypatch.context() as patched:
            patched.setattr(snap.engine, "inference", refuse)
            patched.setattr(snap.engine, "using", refuse)
            patched.setattr(snap.engine.peft, "disable_adapter", refuse)
            serve_way = centroid.embed(snap.engine, ids, router.frozen_base)
        assert router.frozen_base is not None
        assert torch.allclose(serve_way, engine_way, rtol=0, atol=1e-5)
        # the adapter and the backbone change this layer's state: leaving either on would show
        for adapters, on in ((snap.adapters("medic"), False), (None, True)):
            other = centroid.embed(snap.engine, ids, _through_engine(snap, adapters, on))
            assert not torch.allclose(other, engine_way, rtol=0, atol=1e-4)
        assert backbone.enabled  # switched back on for decoding
    finally:
        with torch.no_grad():
            backbone.log_alpha.sub_(math.log(20))


def _through_engine(snap: Snapshot, adapters, backbone: bool):
    """A FrozenBase that runs the engine with `adapters` and the backbone `on`."""

    @contextmanager
    def base():
        with snap.engine.inference(adapters, backbone) as model:
            yield model

    return base
