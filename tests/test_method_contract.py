"""The contract every registered method keeps, checked for each one on a tiny random Llama:
options validated, an exact resume after a kill, state that round-trips through the stack,
and evaluation adapters that match what the method declares. A new method is covered by
registering it (`@register`); nothing here lists methods by hand."""

from __future__ import annotations

import dataclasses
import runpy

import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT
from safetensors.torch import load_file
from test_methods import LORA, TRAIN, A, B
from tiny import tiny_model, tiny_tokenizer

from crma import UserError
from crma.backbone import CRMAConfig
from crma.continual import ContinualModel, StackSpec
from crma.eval.loss import mean_token_loss
from crma.methods import METHODS, Method, make_method
from crma.methods.base import DOMAIN_PREFIX, domain_adapter, register
from crma.settings import Settings
from crma.stack import Stack

DOMAINS = ("alpha", "beta")
DATA = {"alpha": A, "beta": B}


class Killed(Exception):
    pass


def open_stack(path, name: str) -> ContinualModel:
    spec = StackSpec(method=name, method_options={}, lora=LORA, crma=CRMAConfig())
    return ContinualModel.open_or_create(
        path, lambda: (tiny_model(), tiny_tokenizer()), {"name": "tiny", "sha256": ""}, spec
    )


def add(cm: ContinualModel, name: str, data: list[dict], tmp_path) -> None:
    cm.add_domain(name, data, TRAIN, Accelerator(cpu=True), 0, tmp_path / "metrics.jsonl", {})


def killed_then_resumed(open_run, add, tmp_path) -> ContinualModel:
    """Train alpha, get killed at step 7 of beta, reopen (a fresh model, as after a restart)
    and finish beta; returns the reopened stack."""
    run = open_run()
    add(run, "alpha", A, tmp_path)
    original = run.method.batch_examples

    def die_at_step_7(task, step, batch):
        if step == 7:
            raise Killed
        return original(task, step, batch)

    run.method.batch_examples = die_at_step_7
    with pytest.raises(Killed):
        add(run, "beta", B, tmp_path)
    resumed = open_run()
    add(resumed, "beta", B, tmp_path)
    return resumed


def weights(cm: ContinualModel) -> dict[str, torch.Tensor]:
    """What the stack holds: its domains' adapters (parameters and buffers) and the backbone."""
    engine, out = cm.engine, {}
    for adapter in dict.fromkeys(cm.method.adapter_name(d) for d in cm.stack.domains):
        out |= {**engine.adapter_state(adapter), **engine.adapter_buffers(adapter)}
    if engine.backbone is not None:
        out |= {f"backbone.{k}": v for k, v in engine.backbone.state_dict().items()}
    return {k: v.detach().cpu() for k, v in out.items()}


def assert_equal(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory) -> tuple[str, ContinualModel]:
    """Each registered method trained on alpha then beta, without interruption."""
    tmp = tmp_path_factory.mktemp(request.param)
    cm = open_stack(tmp / "stack", request.param)
    for d in DOMAINS:
        add(cm, d, DATA[d], tmp)
    return request.param, cm


# -- registration and options -------------------------------------------------------------------
def test_register_refuses_a_second_method_of_a_name_and_domain_like_adapters():
    class Again(Method):
        name = "naive"

    with pytest.raises(ValueError, match="two methods named 'naive'"):
        register(Again)

    class DomainLike(Method):
        name = "domain-like"

        @classmethod
        def fixed_adapters(cls) -> tuple[str, ...]:
            return (domain_adapter("shared"),)

    with pytest.raises(ValueError, match=f"starts with '{DOMAIN_PREFIX}'"):
        register(DomainLike)
    assert "domain-like" not in METHODS


@pytest.mark.parametrize("name", list(METHODS))
def test_options_are_settings_checked_when_made(name):
    cls = METHODS[name]
    assert issubclass(cls.Options, Settings)
    with pytest.raises(UserError, match="method options: unknown key 'no_such_option'"):
        make_method(name, {"no_such_option": 1})
    defaults = dataclasses.asdict(make_method(name).options)
    assert dataclasses.asdict(make_method(name, defaults).options) == defaults  # written out


# -- training, resuming, reopening ---------------------------------------------------------------
def test_resume_after_a_kill_mid_domain_is_exact(trained, tmp_path):
    """The same weights and method state as the uninterrupted run."""
    name, ref = trained
    resumed = killed_then_resumed(lambda: open_stack(tmp_path / "run", name), add, tmp_path)

    assert_equal(weights(ref), weights(resumed))
    state = Stack.open(tmp_path / "run").component("method_state")
    saved = load_file(str(state)) if state else {}
    assert_equal({k: v.cpu() for k, v in ref.method.state_tensors().items()}, saved)


def test_state_round_trips_through_the_stack(trained):
    name, ref = trained
    reopened = open_stack(ref.stack.path, name)
    assert reopened.method.trained == ref.method.trained == list(DOMAINS)
    assert_equal(
        {k: v.cpu() for k, v in ref.method.state_tensors().items()},
        {k: v.cpu() for k, v in reopened.method.state_tensors().items()},
    )
    assert_equal(weights(ref), weights(reopened))


def test_evaluation_adapters_are_the_declared_ones(trained):
    name, cm = trained
    method, engine = cm.method, cm.engine
    own = {method.adapter_name(d) for d in DOMAINS}
    assert set(engine.adapters) <= own | set(method.fixed_adapters()), engine.adapters
    assert all(a.startswith(DOMAIN_PREFIX) for a in own - set(method.fixed_adapters()))
    chosen = {d: method.eval_adapters(d) for d in DOMAINS}
    for adapters in chosen.values():
        names = [adapters] if isinstance(adapters, str) else adapters
        assert names and set(names) <= set(engine.adapters)
        assert mean_token_loss(engine, DATA["alpha"], adapters) > 0
    # A method needs a task id exactly when its domains are answered by different adapters.
    assert method.needs_task_id == (chosen["alpha"] != chosen["beta"]), chosen
    assert (engine.backbone is not None) == method.uses_crma


def test_the_guide_example_keeps_the_contract(tmp_path):
    """docs/adding-a-method.md's example, registered for this test only."""
    runpy.run_path(str(ROOT / "docs" / "examples" / "l2sp.py"))
    try:
        ref = open_stack(tmp_path / "ref", "l2sp")
        for d in DOMAINS:
            add(ref, d, DATA[d], tmp_path)
        resumed = killed_then_resumed(lambda: open_stack(tmp_path / "run", "l2sp"), add, tmp_path)
        assert_equal(weights(ref), weights(resumed))
        reopened = open_stack(tmp_path / "run", "l2sp")
        anchor = {k: v.cpu() for k, v in reopened.method.state_tensors().items()}
        assert_equal(anchor, {k: v.detach() for k, v in ref.engine.adapter_state("l2sp").items()})
    finally:
        METHODS.pop("l2sp", None)
