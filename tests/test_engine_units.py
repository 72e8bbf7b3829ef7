"""Units of the engine: data order, schedule, evaluation fingerprints."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from crma.batching import batch_order, collate
from crma.engine import Engine, LoraSettings
from crma.train import lr_factor


def test_batch_order_is_seeded_and_covers_each_epoch():
    a = batch_order(10, 4, steps=5, seed=3)
    assert a == batch_order(10, 4, steps=5, seed=3)
    assert a != batch_order(10, 4, steps=5, seed=4)
    flat = [i for batch in a for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_collate_pads_and_masks():
    batch = collate(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_lr_schedule_warms_up_then_decays_to_floor():
    total = 100
    factors = [lr_factor(s, total, 0.1, 0.1) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


def test_fingerprint_tracks_adapter_weights():
    engine = Engine(tiny_model(), tiny_tokenizer(), LoraSettings(r=2), backbone=None)
    engine.add_lora("a", seed=0)
    engine.add_lora("b", seed=1)
    fa, fb, fnone = engine.fingerprint("a"), engine.fingerprint("b"), engine.fingerprint(None)
    assert fa != fb, "different init seeds give different A matrices"
    with torch.no_grad():
        engine.adapter_parameters("a")[1].add_(1.0)
    assert engine.fingerprint("a") != fa and engine.fingerprint("b") == fb
    assert engine.fingerprint(None) == fnone
