"""Units of the engine: data order, schedule, stack commit point, evaluation fingerprints."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from crma import UserError
from crma.batching import batch_order, collate
from crma.engine import Engine, LoraSettings
from crma.stack import Stack, check_domain_name
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


def test_stack_lists_a_domain_only_after_commit(tmp_path):
    stack = Stack.create(tmp_path / "s", {"name": "m", "sha256": "ab"}, "crma", {})
    stack.record_domain({"name": "alpha", "steps": 3})
    assert Stack.open(tmp_path / "s").domains == []
    stack.commit()
    assert Stack.open(tmp_path / "s").domains == ["alpha"]
    with pytest.raises(UserError, match="already exists"):
        stack.record_domain({"name": "alpha"})


def test_stack_refuses_other_base_and_foreign_directory(tmp_path):
    stack = Stack.create(tmp_path / "s", {"name": "m", "sha256": "ab"}, "crma", {})
    with pytest.raises(UserError, match="stack was trained on base"):
        stack.check_base({"name": "m", "sha256": "cd"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UserError, match="not a crma stack"):
        Stack.create(tmp_path / "junk", {"name": "m", "sha256": ""}, "crma", {})
    with pytest.raises(UserError, match="domain name"):
        check_domain_name("../etc")


def test_fingerprint_tracks_adapter_weights():
    engine = Engine(tiny_model(), tiny_tokenizer(), LoraSettings(r=2), backbone=None)
    engine.add_lora("a", seed=0)
    engine.add_lora("b", seed=1)
    fa, fb, fnone = engine.fingerprint("a"), engine.fingerprint("b"), engine.fingerprint(None)
    assert fa != fb, "different init seeds give different A matrices"
    with torch.no_grad():
        engine.lora_parameters("a")[1].add_(1.0)
    assert engine.fingerprint("a") != fa and engine.fingerprint("b") == fb
    assert engine.fingerprint(None) == fnone


@pytest.mark.parametrize("name", ["../etc", "a", "lora", "osf", "ewc", "subspace", "med.v2", ""])
def test_domain_names_that_would_clash_are_refused(name):
    with pytest.raises(UserError, match="domain name"):
        check_domain_name(name)


@pytest.mark.parametrize("name", ["medical", "a1", "code-py", "EU_law"])
def test_plain_domain_names_are_accepted(name):
    assert check_domain_name(name) == name
