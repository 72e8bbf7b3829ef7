"""The head-to-head baselines (ewc, replay, lwf, olora, inflora) on a tiny random Llama.

Units of each method's mechanism, its options, and an exact resume after a simulated kill.
Forgetting itself (drift below naive) is measured end to end in test_methods_protocol.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import Accelerator
from helpers import ROOT
from safetensors.torch import load_file, save_file
from tiny import tiny_model, tiny_tokenizer

from crma import UserError
from crma.adapter import CRMAConfig
from crma.batching import collate
from crma.continual import ContinualModel, StackSpec
from crma.engine import Engine, LoraSettings
from crma.methods import Task, make_method
from crma.methods.base import domain_adapter as ad
from crma.methods.ewc import normalise_per_tensor
from crma.methods.inflora import grow_memory, input_covariances
from crma.methods.layouts import lora_matrices
from crma.methods.lwf import TEACHER, distillation_loss
from crma.methods.olora import orthogonality_loss
from crma.methods.replay import reservoir_sample
from crma.protocol import load_config
from crma.stack import Stack
from crma.train import TrainConfig, Trainer

BASELINES = ["ewc", "replay", "lwf", "olora", "inflora"]
LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
TRAIN = TrainConfig(lr=0.02, batch_size=4, max_steps=8, checkpoint_every=3, precision="fp32")


def domain(first_token: int, n: int = 12, seed: int = 0, length: int = 10) -> list[dict]:
    """Random token sequences from the 100-token range starting at `first_token`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(first_token, first_token + 100, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


A, B = domain(10), domain(300)


def new_engine() -> Engine:
    return Engine(tiny_model(), tiny_tokenizer(), LORA, backbone=None)


def train(engine: Engine, method, name: str, index: int, data, tmp_path, seed: int = 0) -> None:
    trainer = Trainer(engine, method, TRAIN, Accelerator(cpu=True), {"method": method.name})
    task = Task(index, name, seed)
    trainer.train_task(task, data, tmp_path / f"ckpt-{name}", tmp_path / "metrics.jsonl")


def snapshot(engine: Engine, adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.lora_state(adapter).items()}


# -- O-LoRA -----------------------------------------------------------------------------------
def test_olora_orthogonality_loss_is_zero_for_orthogonal_a_and_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    old = {"layer": q[:, :4].T}  # (r, d_in): rows span the old subspace
    assert orthogonality_loss({"layer": q[:, 4:8].T}, old).item() == pytest.approx(0, abs=1e-6)
    # one shared direction: exactly one entry of A_old A_newᵀ is 1
    assert orthogonality_loss({"layer": q[:, 3:7].T}, old).item() == pytest.approx(1, abs=1e-5)


def test_olora_penalises_overlap_with_every_earlier_lora_and_keeps_them_frozen(tmp_path):
    engine, method = new_engine(), make_method("olora", {"lambda_1": 0.5})
    train(engine, method, "alpha", 0, A, tmp_path)
    before_a = snapshot(engine, ad("alpha"))
    method.begin_task(engine, Task(1, "beta", 0), B)
    assert engine.peft.base_model.active_adapter == [ad("alpha"), ad("beta")], (
        "earlier LoRA active in training"
    )
    old, new = (
        lora_matrices(engine, ad("alpha"), "lora_A"),
        lora_matrices(engine, ad("beta"), "lora_A"),
    )
    expected = 0.5 * sum((old[m] @ new[m].T).abs().sum() for m in new)
    assert method.extra_loss(engine, None, None).item() == pytest.approx(expected.item())
    with torch.no_grad():  # make every new row orthogonal to the old rows
        for m, a_new in new.items():
            q, _ = torch.linalg.qr(old[m].T)  # (d_in, r) basis of the old rows
            a_new -= (a_new @ q) @ q.T
    assert method.extra_loss(engine, None, None).item() == pytest.approx(0, abs=1e-5)

    method, engine = make_method("olora", {"lambda_1": 0.5}), new_engine()
    train(engine, method, "alpha", 0, A, tmp_path / "2")
    method.begin_task(engine, Task(1, "beta", 0), B)
    start = method.extra_loss(engine, None, None).item()
    train(engine, method, "beta", 1, B, tmp_path / "2")
    method.begin_task(engine, Task(2, "gamma", 0), B)  # measures against a and b now
    end = orthogonality_loss(
        lora_matrices(engine, ad("beta"), "lora_A"), lora_matrices(engine, ad("alpha"), "lora_A")
    )
    assert end.item() < start / 0.5, "training lowers the overlap with the earlier LoRA"
    assert all(torch.equal(v, before_a[k]) for k, v in snapshot(engine, ad("alpha")).items())
    assert method.eval_adapters("alpha") == [ad("alpha"), ad("beta")], (
        "inference sums every LoRA, no task id"
    )


# -- EWC ----------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically_with_distance(tmp_path):
    engine, method = new_engine(), make_method("ewc", {"ewc_lambda": 3.0})
    method.begin_task(engine, Task(0, "alpha", 0), A)
    assert method.extra_loss(engine, None, None) is None, "nothing to protect on the first domain"
    train(engine, method, "alpha", 0, A, tmp_path)
    method.begin_task(engine, Task(1, "beta", 0), B)
    assert method.extra_loss(engine, None, None).item() == 0.0
    params = engine.lora_state("ewc")
    anchor = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    penalties = []
    for distance in (0.01, 0.02, 0.04):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(anchor[n] + distance * direction[n])
        penalties.append(method.extra_loss(engine, None, None).item())
    assert 0 < penalties[0] < penalties[1] < penalties[2]
    assert penalties[1] / penalties[0] == pytest.approx(4, rel=1e-3)
    for n, f in method.fisher.items():  # each tensor normalised on its own
        assert f.mean().item() == pytest.approx(1, rel=1e-4), n


def test_ewc_fisher_is_normalised_per_tensor_not_jointly():
    tiny, huge = torch.rand(4, 64) * 1e-8, torch.rand(256, 4) * 1e4
    for f in (tiny, huge):
        assert normalise_per_tensor(f).mean().item() == pytest.approx(1, rel=1e-5)
    assert torch.equal(normalise_per_tensor(torch.zeros(3)), torch.zeros(3))


def test_ewc_online_fisher_accumulates_over_domains(tmp_path):
    engine, method = new_engine(), make_method("ewc", {"gamma": 1.0})
    train(engine, method, "alpha", 0, A, tmp_path)
    train(engine, method, "beta", 1, B, tmp_path)
    for f in method.fisher.values():
        assert f.mean().item() == pytest.approx(2, rel=1e-4)  # two domains, each mean 1
    assert all(torch.equal(method.anchor[n], p) for n, p in engine.lora_state("ewc").items())


# -- replay -------------------------------------------------------------------------------------
def fill(per_domain: int, seed: int):
    method = make_method("replay", {"per_domain": per_domain, "ratio": 0.5})
    for i, (name, data) in enumerate([("alpha", A), ("beta", B), ("short", A[:3])]):
        method.end_task(None, Task(i, name, seed), data)
    return method


def test_replay_buffer_holds_the_configured_number_per_domain_and_is_seeded():
    method = fill(per_domain=5, seed=0)
    assert {d: len(kept) for d, kept in method.memory.items()} == {
        "alpha": 5,
        "beta": 5,
        "short": 3,
    }
    assert all(e in A for e in method.memory["alpha"]) and all(
        e in B for e in method.memory["beta"]
    )
    assert fill(5, seed=0).memory == method.memory
    assert fill(5, seed=1).memory != method.memory


def test_reservoir_sample_is_uniform():
    counts = torch.zeros(10)
    for seed in range(3000):
        counts[reservoir_sample(10, 3, seed)] += 1
    assert torch.allclose(counts / 3000, torch.full((10,), 0.3), atol=0.04)


def test_replay_mixes_earlier_domains_into_each_batch_deterministically(tmp_path):
    method = fill(per_domain=5, seed=0)
    task, batch = Task(3, "gamma", 0), B[:4]
    mixed = method.batch_examples(task, 7, batch)
    assert mixed[:4] == batch and len(mixed) == 6, "ratio 0.5 adds 2 to a batch of 4"
    stored = [e for kept in method.memory.values() for e in kept]
    assert all(e in stored for e in mixed[4:])
    assert method.batch_examples(task, 7, batch) == mixed, "same step, same draw"
    draws = {
        tuple(map(tuple, (e["input_ids"] for e in method.batch_examples(task, s, batch)[4:])))
        for s in range(10)
    }
    assert len(draws) > 1, "different steps draw differently"
    assert make_method("replay").batch_examples(Task(0, "alpha", 0), 0, batch) == batch
    save_file(method.state_tensors(), str(tmp_path / "state.safetensors"))
    loaded = make_method("replay")
    loaded.load_state_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert loaded.memory == method.memory


# -- LwF ----------------------------------------------------------------------------------------
def test_distillation_loss_is_zero_for_equal_outputs_and_ignores_masked_positions():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert distillation_loss(teacher, teacher, mask, 2.0).item() == pytest.approx(0, abs=1e-6)
    student = teacher + torch.randn(2, 5, 11, generator=gen)
    loss = distillation_loss(student, teacher, mask, 2.0)
    assert loss.item() > 0
    student[0, 3:] += 100.0  # padded positions do not count
    assert distillation_loss(student, teacher, mask, 2.0).item() == pytest.approx(loss.item())


def test_lwf_distils_from_a_frozen_snapshot_taken_before_the_new_domain(tmp_path):
    engine, method = new_engine(), make_method("lwf")
    method.begin_task(engine, Task(0, "alpha", 0), A)
    assert method.extra_loss(engine, None, None) is None, "no teacher on the first domain"
    train(engine, method, "alpha", 0, A, tmp_path)
    after_a = snapshot(engine, "lwf")
    method.begin_task(engine, Task(1, "beta", 0), B)
    engine.set_trainable(engine.lora_parameters("lwf"))
    batch = collate(B[:4], engine.tokenizer.pad_token_id)
    assert method.extra_loss(engine, batch, engine.model(**batch)).item() == pytest.approx(
        0, abs=1e-6
    )
    train(engine, method, "beta", 1, B, tmp_path)
    teacher = {k.replace(f".{TEACHER}.", ".lwf."): v for k, v in snapshot(engine, TEACHER).items()}
    assert teacher.keys() == after_a.keys()
    assert all(torch.equal(teacher[k], after_a[k]) for k in teacher), "teacher stays frozen"
    distilled = method.extra_loss(engine, batch, engine.model(**batch))
    assert distilled.item() > 0 and distilled.requires_grad


# -- InfLoRA ----------------------------------------------------------------------------------
def test_inflora_new_down_projection_is_orthogonal_to_earlier_inputs_and_frozen(tmp_path):
    engine, method = new_engine(), make_method("inflora")
    train(engine, method, "alpha", 0, A, tmp_path)
    memory = {m: t.clone() for m, t in method.memory.items()}
    modules = list(memory)
    assert len(modules) == 2 * 3, "one memory per adapted layer"
    covariances = input_covariances(engine, modules, A)
    for m, basis in memory.items():
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)
        captured = torch.trace(basis.T @ covariances[m] @ basis) / torch.trace(covariances[m])
        assert captured >= 0.95 - 1e-4, f"{m}: memory holds {captured:.3f} of a's input energy"
    a_weights = snapshot(engine, ad("alpha"))
    train(engine, method, "beta", 1, B, tmp_path)
    for m, down in lora_matrices(engine, ad("beta"), "lora_A").items():
        assert (down @ memory[m]).abs().max().item() < 1e-4, (
            "b's A rows are orthogonal to a's inputs"
        )
        assert torch.linalg.matrix_rank(down).item() == LORA.r
    assert all(torch.equal(v, a_weights[k]) for k, v in snapshot(engine, ad("alpha")).items())
    assert all(lora_matrices(engine, ad("beta"), "lora_B")[m].abs().sum() > 0 for m in modules), (
        "B trained"
    )
    assert method.eval_adapters("alpha") == [ad("alpha"), ad("beta")]


def test_inflora_memory_grows_by_the_energy_rule():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1] + [0.0] * 4)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    cov = basis @ torch.diag(scales) @ basis.T  # energies 10, 5, 1, 0.1 (total 16.1)
    first = grow_memory(None, cov, threshold=0.9)
    assert first.shape == (8, 2), "10 + 5 = 93% ≥ 90% of the energy"
    grown = grow_memory(first, cov, threshold=0.99)
    assert grown.shape == (8, 3) and torch.allclose(grown[:, :2], first)
    assert grow_memory(grown, cov, threshold=1.0).shape == (8, 4), "zero-energy directions skipped"


# -- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ewc", {"lambda": 1.0}, "unknown key 'lambda'"),
        ("ewc", {"ewc_lambda": -1}, "ewc_lambda: expected a finite number >= 0, got -1"),
        ("ewc", {"gamma": 2}, "gamma: expected a finite number in [0, 1], got 2"),
        ("replay", {"per_domain": "fifty"}, "per_domain: expected an integer >= 0, got 'fifty'"),
        ("replay", {"ratio": -0.5}, "ratio: expected a finite number >= 0, got -0.5"),
        ("lwf", {"temperature": 0}, "temperature: expected a finite number > 0, got 0"),
        ("olora", {"lambda_1": -0.5}, "lambda_1: expected a finite number >= 0, got -0.5"),
        (
            "inflora",
            {"threshold_start": 1.5},
            "threshold_start: expected a finite number in (0, 1]",
        ),
        ("ewc", {"fisher_examples": 0}, "fisher_examples: expected an integer >= 1, got 0"),
    ],
)
def test_a_wrong_option_is_a_clear_user_error(name, options, message):
    with pytest.raises(UserError, match=re.escape(f"method options: {message}")):
        make_method(name, options)


def test_methods_declare_task_id_and_defaults_from_their_papers():
    for name in BASELINES:
        assert make_method(name).needs_task_id is False
    assert make_method("olora").options.lambda_1 == 0.5
    assert make_method("replay").options.per_domain == 50
    lwf = make_method("lwf").options
    assert (lwf.weight, lwf.temperature) == (1.0, 2.0)
    inflora = make_method("inflora").options
    assert (inflora.threshold_start, inflora.threshold_end) == (0.95, 1.0)


def test_baselines_config_runs_every_method_on_the_paper_protocol():
    config = load_config(ROOT / "configs" / "baselines.yaml")
    names = [m.name for m in config.methods]
    assert set(names) >= {"naive", "frozen", "crma", "crma-task1", *BASELINES}
    for spec in config.methods:
        make_method(spec.name, spec.options)
    assert config.seeds == [0, 42, 1234] and len(config.corpus.order) == 5
    assert (config.corpus.train_size, config.corpus.holdout_size) == (500, 100)


# -- resume -------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def open_stack(path, name: str) -> ContinualModel:
    spec = StackSpec(method=name, method_options={}, lora=LORA, crma=CRMAConfig())
    return ContinualModel.open_or_create(
        path, lambda: (tiny_model(), tiny_tokenizer()), {"name": "tiny", "sha256": ""}, spec
    )


def add(cm: ContinualModel, name: str, data, tmp_path) -> None:
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


@pytest.mark.parametrize("name", BASELINES)
def test_resume_after_a_kill_mid_domain_is_exact(name, tmp_path):
    ref = open_stack(tmp_path / "ref", name)
    for d, data in (("alpha", A), ("beta", B)):
        add(ref, d, data, tmp_path)

    resumed = killed_then_resumed(lambda: open_stack(tmp_path / "run", name), add, tmp_path)

    for adapter in dict.fromkeys(ref.method.adapter_name(d) for d in ("alpha", "beta")):
        want, got = ref.engine.lora_state(adapter), resumed.engine.lora_state(adapter)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), adapter
    state = Stack.open(tmp_path / "run").component("method_state")
    want = ref.method.state_tensors()
    got = load_file(str(state)) if state else {}
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k].cpu(), got[k]) for k in want)
