"""OSF (PEFT's Orthogonal Subspace Fine-tuning) as a continual-learning method, on a tiny Llama.

Its mechanism (updates orthogonal to the frozen top singular subspace, merge and re-decompose
between domains with a growing frozen rank), its options, evaluation fingerprints that see
merged base weights, exact reopen and resume, and forgetting against naive through `crma run`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT, crma_cmd, crma_env, run_crma
from peft import PeftModel
from test_method_contract import killed_then_resumed
from test_methods import LORA, A, B
from tiny import tiny_model, tiny_tokenizer

from crma import UserError
from crma.backbone import CRMAConfig
from crma.continual import ContinualModel, StackSpec
from crma.engine import ENGINE_STATE, Engine
from crma.methods import Task, make_method
from crma.methods.osf import ADAPTER, SubspaceProjector, osf_layers
from crma.protocol.config import load_config
from crma.stack import Stack
from crma.train import TrainConfig, Trainer

TRAIN = TrainConfig(lr=0.02, batch_size=4, max_steps=8, checkpoint_every=3, precision="fp32")
OPTIONS = {"lr": 0.003}  # the tiny random model; the default (1e-4) is for real models
TINY = ROOT / "configs" / "tiny-baselines.yaml"
METHODS = f"methods=[naive, {{name: osf, options: {{lr: {OPTIONS['lr']}}}}}]"


def new_engine() -> Engine:
    return Engine(tiny_model(), tiny_tokenizer(), LORA, backbone=None)


def train(engine: Engine, method, name: str, index: int, data, tmp_path) -> None:
    trainer = Trainer(engine, method, TRAIN, Accelerator(cpu=True), {"method": method.name})
    trainer.train_task(Task(index, name, 0), data, tmp_path / f"ckpt-{name}", tmp_path / "m.jsonl")


def leak(engine: Engine) -> float:
    """Largest share of an update's norm inside the top-k singular subspace of its base weight.

    The subspace is computed afresh from the weight each layer decomposed, not read from OSF.
    """
    worst = 0.0
    for layer in osf_layers(engine).values():
        delta = layer.get_delta_weight(ADAPTER)
        u, _, vh = torch.linalg.svd(layer.get_base_layer().weight.float(), full_matrices=False)
        k = layer.effective_rank[ADAPTER]
        norm = delta.norm()
        assert norm > 0, "the layer trained"
        left, right = (u[:, :k].T @ delta).norm() / norm, (delta @ vh[:k].T).norm() / norm
        worst = max(worst, left.item(), right.item())
    return worst


def test_update_stays_orthogonal_to_the_frozen_top_singular_subspace(tmp_path):
    engine, method = new_engine(), make_method("osf", OPTIONS)
    train(engine, method, "alpha", 0, A, tmp_path)
    assert leak(engine) < 1e-4
    ranks = {p: layer.effective_rank[ADAPTER] for p, layer in osf_layers(engine).items()}
    assert ranks["base_model.model.model.layers.0.self_attn.q_proj"] == 32, "half of 64"
    trained = {
        p.removeprefix("base_model.model."): layer.get_base_layer().weight.detach()
        + layer.get_delta_weight(ADAPTER).detach()
        for p, layer in osf_layers(engine).items()
    }

    train(engine, method, "beta", 1, B, tmp_path)  # merge alpha, decompose again, train beta
    assert engine.merged == set(trained), "every target weight now holds alpha's update"
    for path, weight in trained.items():
        assert torch.allclose(engine.base_weight(path), weight, atol=1e-6), path
    grown = {p: layer.effective_rank[ADAPTER] for p, layer in osf_layers(engine).items()}
    assert all(grown[p] > ranks[p] for p in ranks), "the frozen subspace grows per domain"
    assert leak(engine) < 1e-4
    assert method.eval_adapters("alpha") == ADAPTER and method.needs_task_id is False


def test_adamw_leaks_out_of_the_subspace_without_the_parameter_projection(tmp_path, monkeypatch):
    """Why the authors' post-step projection is needed: PEFT projects gradients only."""
    monkeypatch.setattr(SubspaceProjector, "project", lambda self, layer: None)
    engine = new_engine()
    train(engine, make_method("osf", OPTIONS), "alpha", 0, A, tmp_path)
    assert leak(engine) > 1e-2


def test_frozen_fraction_rises_in_equal_steps_towards_one():
    options = make_method("osf").options
    fractions = [options.frozen_fraction(i) for i in range(7)]
    assert fractions == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    assert (options.effective_rank, options.lr, options.target_modules) == (0.5, 1e-4, None)
    three = make_method("osf", {"effective_rank": 0.25, "total_domains": 3}).options
    assert [three.frozen_fraction(i) for i in range(3)] == pytest.approx([0.25, 0.5, 0.75])


def test_trainable_rank_trains_the_same_budget_as_a_lora_on_every_domain(tmp_path):
    """The bottom r singular directions of q and v, r·(d_out + d_in + 1) parameters per matrix
    (a rank-r LoRA: r·(d_out + d_in)), counted here from the base model's own weights."""
    r, targets = 2, ["q_proj", "v_proj"]
    engine = new_engine()
    shapes = [
        tuple(m.weight.shape)
        for path, m in engine.base.named_modules()
        if path.rsplit(".", 1)[-1] in targets
    ]
    assert len(shapes) == 2 * 2 and (32, 64) in shapes, "tiny Llama: 2 layers, v is 32 × 64"
    budget = sum(r * (d_out + d_in + 1) for d_out, d_in in shapes)
    method = make_method("osf", {**OPTIONS, "target_modules": targets, "trainable_rank": r})
    for index, (name, data) in enumerate([("alpha", A), ("beta", B)]):
        train(engine, method, name, index, data, tmp_path)
        layers = osf_layers(engine)
        assert {p.rsplit(".", 1)[-1] for p in layers} == set(targets)
        for layer in layers.values():
            weight = layer.get_base_layer().weight
            assert layer.effective_rank[ADAPTER] == min(weight.shape) - r
        trainable = sum(p.numel() for p in engine.adapter_parameters(ADAPTER))
        assert trainable == budget, f"{name}: {trainable} trainable, want {budget}"
        assert leak(engine) < 1e-4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"trainable_rank": 0}, "trainable_rank: expected an integer >= 1, got 0"),
        ({"effective_rank": 1.5}, "effective_rank: expected a finite number in (0, 1), got 1.5"),
        ({"effective_rank": 0}, "effective_rank: expected a finite number in (0, 1), got 0"),
        ({"total_domains": 0}, "total_domains: expected an integer >= 1, got 0"),
        ({"lr": -1.0}, "lr: expected a finite number > 0, got -1.0"),
        ({"rank": 8}, "unknown key 'rank'"),
        ({"target_modules": "q_proj"}, "target_modules: expected a list"),
        ({"target_modules": [""]}, "target_modules: expected a list, each item a module name"),
    ],
)
def test_a_wrong_option_is_a_clear_user_error(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        make_method("osf", options)


def test_fingerprint_sees_osf_buffers_and_merged_base_weights(tmp_path):
    engine, method = new_engine(), make_method("osf", OPTIONS)
    base_print = engine.fingerprint(None)
    train(engine, method, "alpha", 0, A, tmp_path)
    assert engine.fingerprint(None) == base_print, "nothing merged yet"
    trained = engine.fingerprint(ADAPTER)
    buffer = next(iter(engine.adapter_buffers(ADAPTER).values()))
    with torch.no_grad():
        buffer.add_(1e-3)
    assert engine.fingerprint(ADAPTER) != trained, "OSF's frozen factors count"
    with torch.no_grad():
        buffer.sub_(1e-3)
    method.begin_task(engine, Task(1, "beta", 0), B)  # merges alpha into the base weights
    assert engine.fingerprint(None) != base_print, "merged base weights count, even unadapted"
    assert engine.fingerprint(ADAPTER) != trained


def snapshot(engine: Engine) -> dict[str, torch.Tensor]:
    """Every tensor OSF's model depends on: adapter, its buffers, merged base weights."""
    state = {**engine.adapter_state(ADAPTER), **engine.adapter_buffers(ADAPTER)}
    state |= {f"base/{p}": engine.base_weight(p) for p in engine.merged}
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]


def osf_stack(path) -> ContinualModel:
    spec = StackSpec(method="osf", method_options=OPTIONS, lora=LORA, crma=CRMAConfig())
    tiny = {"name": "tiny", "sha256": ""}
    return ContinualModel.open_or_create(path, lambda: (tiny_model(), tiny_tokenizer()), tiny, spec)


def add(cm: ContinualModel, name: str, data, tmp_path, replace: bool = False) -> None:
    acc, metrics = Accelerator(cpu=True), tmp_path / "metrics.jsonl"
    cm.add_domain(name, data, TRAIN, acc, 0, metrics, {}, replace=replace)


def test_reopen_and_resume_after_a_kill_are_exact(tmp_path):
    ref = osf_stack(tmp_path / "ref")
    add(ref, "alpha", A, tmp_path)
    reopened = osf_stack(tmp_path / "ref")
    assert_same(snapshot(ref.engine), snapshot(reopened.engine))
    add(ref, "beta", B, tmp_path)
    folder = Stack.open(tmp_path / "ref").adapter_dir("beta")
    assert (folder / ENGINE_STATE).is_file(), "merged base weights and SVD buffers are saved"
    PeftModel.from_pretrained(tiny_model(), str(folder))  # and plain PEFT loads the adapter
    reopened = osf_stack(tmp_path / "ref")  # merged alpha + beta's adapter on top
    assert reopened.method.options.lr == OPTIONS["lr"]
    assert_same(snapshot(ref.engine), snapshot(reopened.engine))
    assert reopened.engine.fingerprint(ADAPTER) == ref.engine.fingerprint(ADAPTER)
    batch = {"input_ids": torch.tensor([A[0]["input_ids"]])}
    with ref.engine.using(ADAPTER), reopened.engine.using(ADAPTER), torch.no_grad():
        assert torch.equal(ref.engine.model(**batch).logits, reopened.engine.model(**batch).logits)

    resumed = killed_then_resumed(lambda: osf_stack(tmp_path / "run"), add, tmp_path)
    assert_same(snapshot(ref.engine), snapshot(resumed.engine))


def test_replace_retrains_the_last_domain_from_its_base_and_refuses_earlier_ones(tmp_path):
    ref = osf_stack(tmp_path / "ref")
    add(ref, "alpha", A, tmp_path)
    add(ref, "beta", B, tmp_path)
    other = osf_stack(tmp_path / "other")
    add(other, "alpha", A, tmp_path)
    add(other, "beta", A, tmp_path)  # the wrong data
    add(other, "beta", B, tmp_path, replace=True)  # in the same process
    assert_same(snapshot(ref.engine), snapshot(other.engine))
    other = osf_stack(tmp_path / "other")
    add(other, "beta", B, tmp_path, replace=True)  # after a restart
    assert_same(snapshot(ref.engine), snapshot(other.engine))
    with pytest.raises(UserError, match="cannot retrain domain 'alpha'"):
        add(osf_stack(tmp_path / "other"), "alpha", A, tmp_path, replace=True)


# -- end to end through `crma run` -------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("osf") / "run"
    run_crma("run", str(TINY), "--out", str(out), "--set", METHODS)
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.integration
def test_osf_forgets_less_than_naive_and_still_learns(report):
    methods = report[1]["methods"]
    naive = methods["naive"]["per_seed"]["0"]["drift"]
    osf = methods["osf"]["per_seed"]["0"]["drift"]
    assert naive > 1.0, f"naive should forget the conflicting domains (drift {naive:.3f}%)"
    assert osf < naive, f"osf drift {osf:.3f}% is not below naive's {naive:.3f}%"
    L = methods["osf"]["per_seed"]["0"]["loss_matrix"]
    for k in range(len(L) - 1):
        assert L[k + 1][k] < L[0][k], f"osf did not learn domain {k}"


@pytest.mark.integration
def test_protocol_run_resumes_after_sigkill_to_the_same_numbers(report, tmp_path):
    out = tmp_path / "killed"
    metrics = out / "osf" / "seed-0" / "metrics.jsonl"
    cmd = crma_cmd("run", str(TINY), "--out", str(out), "--set", METHODS)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=crma_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"domain": "beta"' in metrics.read_text():
            proc.kill()  # SIGKILL while osf trains beta: alpha is merged in memory only
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -9, "the run should have been killed while osf trained beta"
    run_crma("run", str(TINY), "--out", str(out), "--set", METHODS)
    assert json.loads((out / "report.json").read_text()) == report[1]
    assert metrics.read_text().count("\n") == 3 * 24


def test_configs_list_osf_with_its_options():
    tiny = {m.key: m.options for m in load_config(TINY).methods}
    assert tiny["osf"] == OPTIONS, "the end-to-end tests above run the tiny config's osf"
    paper = {m.key: m.options for m in load_config(ROOT / "configs" / "baselines.yaml").methods}
    make_method("osf", paper["osf"])
    assert {"effective_rank", "total_domains", "lr"} <= set(paper["osf"])
    qv = make_method("osf", paper["osf-qv"]).options  # the budget-matched control
    assert (qv.target_modules, qv.trainable_rank) == (["q_proj", "v_proj"], 8)
