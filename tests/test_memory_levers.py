"""Memory levers change memory, not results: gradient checkpointing and gradient accumulation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator
from tiny import tiny_model, tiny_tokenizer

from crma.backbone import CRMAConfig, attach_crma
from crma.engine import Engine, LoraSettings
from crma.methods import Task, make_method
from crma.train import TrainConfig, Trainer

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
TRAIN = TrainConfig(lr=0.01, batch_size=8, max_steps=3, precision="fp32", zclip=False)


def examples(n: int = 24) -> list[dict]:
    """Sequences of 4 to 19 tokens: micro-batches hold different token counts."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=gen))
        ids = torch.randint(10, 400, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def train_crma(cfg: TrainConfig, tmp_path, calls: dict[str, int] | None = None):
    """Three steps of `crma` (LoRA + backbone) from the same start; trainable weights, losses.

    `calls` counts forward passes of the attention modules (inside the checkpointed layer
    forward) and of the CRMA maps (forward hooks on the layers).
    """
    model = tiny_model()
    backbone = attach_crma(model, CRMAConfig())
    with torch.no_grad():  # off the identity, so every backbone weight gets a gradient
        backbone.write_weights.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    if calls is not None:
        count = lambda key: lambda *_: calls.update({key: calls.get(key, 0) + 1})  # noqa: E731
        mix = backbone.mix
        backbone.mix = lambda layer, h: (count("crma")(), mix(layer, h))[1]
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(count("attention"))
    engine = Engine(model, tiny_tokenizer(), LORA, backbone)
    method = make_method("crma")
    metrics = tmp_path / "metrics.jsonl"
    Trainer(engine, method, cfg, Accelerator(cpu=True), {}).train_task(
        Task(0, "alpha", 0), examples(), tmp_path / "ckpt", metrics
    )
    weights = {n: p.detach().clone() for n, p in engine.model.named_parameters() if "lora_" in n}
    weights |= {f"crma.{n}": p.detach().clone() for n, p in backbone.named_parameters()}
    losses = [json.loads(line)["loss"] for line in metrics.open()]
    return weights, losses


def assert_same(a, b, tolerance: float) -> None:
    (wa, la), (wb, lb) = a, b
    assert la == pytest.approx(lb, abs=tolerance)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tolerance


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_training(tmp_path):
    """transformers checkpoints each layer's `forward`; CRMA's forward hooks sit outside it, so
    they run once and keep their own (B, T, n) activations, and the training is unchanged."""
    plain_calls: dict[str, int] = {}
    checkpointed_calls: dict[str, int] = {}
    plain = train_crma(TRAIN, tmp_path / "plain", plain_calls)
    checkpointed = train_crma(
        dataclasses.replace(TRAIN, gradient_checkpointing=True),
        tmp_path / "ckpt",
        checkpointed_calls,
    )
    passes = 3 * 2  # 3 steps × 2 layers
    assert plain_calls == {"attention": passes, "crma": passes}
    assert checkpointed_calls == {"attention": 2 * passes, "crma": passes}  # recomputed in backward
    assert_same(plain, checkpointed, 1e-6)  # the same float32 ops, recomputed


def test_gradient_accumulation_equals_one_batch(tmp_path):
    """batch 8 in one pass == 2 micro-batches of 4: both divide by the batch's token count
    (a mean of the two micro-batch means would weigh their tokens unequally)."""
    whole = train_crma(TRAIN, tmp_path / "whole")
    accumulated = train_crma(dataclasses.replace(TRAIN, grad_accum=2), tmp_path / "accum")
    assert_same(whole, accumulated, 1e-5)  # float32 sums in another order, over 3 steps
    assert whole[0]["crma.write_weights"].abs().max() > 0.05  # it trained


@pytest.mark.parametrize(
    "mark, recorded",
    [(None, "float"), ("is_loaded_in_4bit", "4bit"), ("is_loaded_in_8bit", "8bit")],
)
def test_how_the_base_is_loaded_is_recorded(tmp_path, mark, recorded):
    """The mark transformers leaves on a bitsandbytes load goes into every metrics line and
    the domain's result (its manifest entry). The weights stay float: no GPU here."""
    model = tiny_model()
    if mark is not None:
        setattr(model, mark, True)
    engine = Engine(model, tiny_tokenizer(), LORA, backbone=None)
    metrics = tmp_path / "metrics.jsonl"
    trainer = Trainer(
        engine, make_method("naive"), TRAIN, Accelerator(cpu=True), {"method": "naive"}
    )
    result = trainer.train_task(Task(0, "alpha", 0), examples(), tmp_path / "ckpt", metrics)
    assert result["load_in"] == recorded
    assert [json.loads(line)["load_in"] for line in metrics.open()] == [recorded] * 3
