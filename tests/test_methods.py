"""The head-to-head baselines (ewc, replay, lwf, olora, inflora) on a tiny random Llama.

Units of each method's mechanism and its options; what every method must do (an exact resume
after a kill among it) is tests/test_method_contract.py's. Forgetting itself (drift below naive) is measured end to end in test_methods_protocol.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from helpers import ROOT
from safetensors.torch import load_file, save_file
from tiny import tiny_model, tiny_tokenizer

from crma import UserError
from crma.batching import batch_order, collate, first_drawn
from crma.engine import Engine, LoraSettings
from crma.methods import Task, make_method
from crma.methods.base import domain_adapter as ad
from crma.methods.inflora import grow_memory, input_covariances, interference_free_down
from crma.methods.layouts import lora_matrices
from crma.methods.lwf import TEACHER, distillation_loss
from crma.methods.olora import orthogonality_loss
from crma.methods.replay import reservoir_sample
from crma.protocol.config import load_config
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
    return {k: v.detach().clone() for k, v in engine.adapter_state(adapter).items()}


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
    params = engine.adapter_state("ewc")
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


def reference_fisher(engine: Engine, adapter: str, examples) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of the example's mean token loss, written out
    independently of crma's: the next-token cross-entropy from the logits, `.backward()`."""
    params = engine.adapter_state(adapter)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    engine.model.eval()
    for example in examples:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        logits = engine.model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        target = torch.tensor(example["labels"][1:])
        F.cross_entropy(logits[target != -100], target[target != -100]).backward()
        for n, p in params.items():
            total[n] += p.grad.pow(2)
    engine.model.train()
    return {n: t / len(examples) for n, t in total.items()}


def test_ewc_fisher_is_the_raw_empirical_fisher_accumulated_online(tmp_path):
    engine, method = new_engine(), make_method("ewc", {"gamma": 0.5})
    train(engine, method, "alpha", 0, A, tmp_path)
    after_a = reference_fisher(engine, "ewc", A)
    for n, f in method.fisher.items():  # raw: no tensor rescaled, A and B on one scale
        assert torch.allclose(f, after_a[n], rtol=1e-4, atol=1e-12), n
    scales = [f.mean().item() for f in method.fisher.values()]
    assert max(scales) / min(scales) > 10, "tensors keep their own Fisher scale"
    train(engine, method, "beta", 1, B, tmp_path)
    after_b = reference_fisher(engine, "ewc", B)
    for n, f in method.fisher.items():
        assert torch.allclose(f, 0.5 * after_a[n] + after_b[n], rtol=1e-4, atol=1e-12), n
    assert all(torch.equal(method.anchor[n], p) for n, p in engine.adapter_state("ewc").items())


# -- replay -------------------------------------------------------------------------------------
def stream(method, engine: Engine, task: Task, data, steps: int = 8, batch_size: int = 4) -> None:
    """What the trainer does to a method's data, without training: the same batch order."""
    order = batch_order(len(data), batch_size, steps, task.rng_seed("data"))
    task = replace(task, train_indices=first_drawn(order))
    method.begin_task(engine, task, data)
    for step, indices in enumerate(order):
        method.batch_examples(task, step, [data[j] for j in indices])
    method.end_task(engine, task, data)


def fill(per_domain: int, seed: int, steps: int = 8):
    method, engine = make_method("replay", {"per_domain": per_domain, "ratio": 0.5}), new_engine()
    for i, (name, data) in enumerate([("alpha", A), ("beta", B), ("short", A[:3])]):
        stream(method, engine, Task(i, name, seed), data, steps)
    return method, engine


def test_replay_buffer_holds_the_configured_number_per_domain_and_is_seeded():
    method, _ = fill(per_domain=5, seed=0)
    assert {d: len(kept) for d, kept in method.memory.items()} == {
        "alpha": 5,
        "beta": 5,
        "short": 3,
    }
    assert all(e in A for e in method.memory["alpha"]) and all(
        e in B for e in method.memory["beta"]
    )
    assert fill(5, seed=0)[0].memory == method.memory
    assert fill(5, seed=1)[0].memory != method.memory


def test_reservoir_sample_is_uniform():
    counts = torch.zeros(10)
    for seed in range(3000):
        counts[reservoir_sample(10, 3, seed)] += 1
    assert torch.allclose(counts / 3000, torch.full((10,), 0.3), atol=0.04)


def test_replay_stores_only_examples_the_domain_trained_on(tmp_path):
    """8 steps of 4 draw 32 of 40 examples: the 8 never trained on must never be replayed."""
    data = domain(10, n=40, seed=3)
    task = Task(0, "alpha", 0)
    seen = {j for batch in batch_order(40, 4, 8, task.rng_seed("data")) for j in batch}
    assert len(seen) == 32
    for per_domain in (20, 50):
        engine, method = new_engine(), make_method("replay", {"per_domain": per_domain})
        train(engine, method, "alpha", 0, data, tmp_path / str(per_domain))
        stored = [data.index(e) for e in method.memory["alpha"]]
        assert len(set(stored)) == len(stored) == min(per_domain, 32)
        assert set(stored) <= seen, f"replayed examples never trained on: {set(stored) - seen}"
    assert set(stored) == seen, "a memory larger than the stream keeps all of it"


def test_replay_mixes_earlier_domains_into_each_batch_deterministically(tmp_path):
    method, engine = fill(per_domain=5, seed=0)
    task, batch = Task(3, "gamma", 0), B[:4]
    method.begin_task(engine, task, B)
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
    first = make_method("replay")
    first.begin_task(new_engine(), Task(0, "alpha", 0), B)
    assert first.batch_examples(Task(0, "alpha", 0), 0, batch) == batch
    method.end_task(engine, task, B)
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
    engine.set_trainable(engine.adapter_parameters("lwf"))
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
def authors_update_dual_gpm(
    feature: torch.Tensor | None, activation: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The authors' `update_DualGPM` (its 'remove' branch; methods/inflora.py of
    liangyanshuo/InfLoRA) for one layer, transcribed to torch. `activation` is their
    `cur_matrix`: the inputs' covariance C, not the inputs."""
    u, s, _ = torch.linalg.svd(activation, full_matrices=False)
    if feature is None:  # after the first task (Eq-5)
        ratio = s**2 / (s**2).sum()
        r = int((torch.cumsum(ratio, 0) < threshold).sum())
        return u[:, : max(r, 1)]
    sval_total = (s**2).sum()
    act_hat = activation - feature @ feature.T @ activation  # Eq-8
    u, s, _ = torch.linalg.svd(act_hat, full_matrices=False)
    ratio = s**2 / sval_total
    accumulated = (sval_total - (s**2).sum()) / sval_total
    r = 0
    for value in ratio:  # Eq-9
        if accumulated >= threshold:
            break
        accumulated += value
        r += 1
    ui = torch.cat([feature, u[:, :r]], dim=1)
    return ui[:, : ui.shape[0]]


def projector(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection onto a basis's span: compares subspaces, not signs."""
    q, _ = torch.linalg.qr(basis.double())
    return q @ q.T


def random_covariance(d: int, n: int, seed: int) -> torch.Tensor:
    """C = H Hᵀ / n for n inputs H of dimension d with unequal scales (distinct energies)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(d, n, generator=gen) * torch.logspace(0, -1.5, d).unsqueeze(1)
    return h @ h.T / n


def test_inflora_code_variant_grows_the_memory_as_the_authors_update_dual_gpm():
    memory, reference = None, None
    for t, threshold in enumerate([0.9, 0.92, 0.94]):  # lamb 0.9 rising over 5 domains
        cov = random_covariance(12, 50, seed=t)
        memory = grow_memory(memory, cov, threshold, "code")
        reference = authors_update_dual_gpm(reference, cov, threshold)
        assert memory.shape == reference.shape, t
        assert torch.allclose(projector(memory), projector(reference), atol=1e-5), t
    assert torch.allclose(memory.T @ memory, torch.eye(memory.shape[1]), atol=1e-5)


def test_inflora_code_variant_sets_a_from_the_one_sided_projection():
    """A's rows are the top left singular vectors of (I − M Mᵀ) C: the top eigenvectors of
    (I − M Mᵀ) C² (I − M Mᵀ), computed here by eigh. The paper variant's are those of
    (I − M Mᵀ) C (I − M Mᵀ); the two differ where M does not commute with C."""
    cov, memory = (
        random_covariance(12, 50, seed=0),
        grow_memory(None, random_covariance(12, 50, 1), 0.5, "code"),
    )
    off = torch.eye(12) - memory @ memory.T
    for variant, target in (("code", off @ cov @ cov @ off), ("paper", off @ cov @ off)):
        down = interference_free_down(cov, memory, 3, variant)
        _, vectors = torch.linalg.eigh(target.double())
        want = vectors[:, -3:].T.float() / math.sqrt(3)
        assert torch.allclose(projector(down.T), projector(want.T), atol=1e-4), variant
        assert torch.allclose(down @ down.T, torch.eye(3) / 3, atol=1e-5)
        assert (down @ memory).abs().max() < 1e-5, "orthogonal to earlier inputs"
    code, paper = (interference_free_down(cov, memory, 3, v) for v in ("code", "paper"))
    assert not torch.allclose(projector(code.T), projector(paper.T), atol=1e-2)


def test_inflora_energy_rule_of_each_variant():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1] + [0.0] * 4)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    cov = basis @ torch.diag(scales) @ basis.T  # eigenvalues 10, 5, 1, 0.1 (total 16.1)
    # paper: energies 10, 5, 1, 0.1; the direction that crosses the threshold is kept
    first = grow_memory(None, cov, 0.9, "paper")
    assert first.shape == (8, 2), "10 + 5 = 93% ≥ 90% of the energy"
    grown = grow_memory(first, cov, 0.99, "paper")
    assert grown.shape == (8, 3) and torch.allclose(grown[:, :2], first)
    assert grow_memory(grown, cov, 1.0, "paper").shape == (8, 4), "zero-energy directions skipped"
    # code: energies 100, 25, 1, 0.01 (σ⁴); the first domain keeps only what stays below it
    assert grow_memory(None, cov, 0.9, "code").shape == (8, 1), "100/126 = 79%; 125/126 ≥ 90%"
    assert grow_memory(None, cov, 0.5, "code").shape == (8, 1), "at least one direction"
    first = grow_memory(None, cov, 0.995, "code")
    assert first.shape == (8, 2) and torch.allclose(projector(first), projector(basis[:, :2]))
    assert grow_memory(first, cov, 0.99995, "code").shape == (8, 4), "adds the crossing one"


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_inflora_new_down_projection_is_orthogonal_to_earlier_inputs_and_frozen(variant, tmp_path):
    engine, method = new_engine(), make_method("inflora", {"variant": variant})
    train(engine, method, "alpha", 0, A, tmp_path)
    memory = {m: t.clone() for m, t in method.memory.items()}
    modules = list(memory)
    assert len(modules) == 2 * 3, "one memory per adapted layer"
    covariances = input_covariances(engine, modules, A)
    for m, basis in memory.items():
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)
        if variant == "code":  # at the default lamb, 0.95
            want = authors_update_dual_gpm(None, covariances[m], 0.95)
            assert torch.allclose(projector(basis), projector(want), atol=1e-4), m
        else:
            captured = torch.trace(basis.T @ covariances[m] @ basis) / torch.trace(covariances[m])
            assert captured >= 0.95 - 1e-4, f"{m}: memory holds {captured:.3f} of a's energy"
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


def test_inflora_measures_only_the_examples_the_domain_trains_on(tmp_path):
    """8 steps of 4 draw 32 of 40 examples: the memory is the authors' update over the inputs
    of those 32 (as the authors' loader holds exactly the data they train on), not of all 40."""
    data = domain(10, n=40, seed=3)
    engine, method = new_engine(), make_method("inflora")
    train(engine, method, "alpha", 0, data, tmp_path)
    drawn = first_drawn(batch_order(40, 4, 8, Task(0, "alpha", 0).rng_seed("data")))
    assert len(drawn) == 32
    trained = input_covariances(engine, list(method.memory), [data[i] for i in drawn])
    everything = input_covariances(engine, list(method.memory), data)
    for m, basis in method.memory.items():
        want = authors_update_dual_gpm(None, trained[m], 0.95)
        assert torch.allclose(projector(basis), projector(want), atol=1e-4), m
    assert any(not torch.allclose(trained[m], everything[m], atol=1e-4) for m in method.memory), (
        "the unseen 8 change the statistics, so the test can tell them apart"
    )


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
        ("inflora", {"variant": "gpm"}, "variant: expected one of code, paper, got 'gpm'"),
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
    assert (inflora.threshold_start, inflora.threshold_end, inflora.variant) == (0.95, 1.0, "code")


def test_baselines_config_runs_every_method_on_the_paper_protocol():
    config = load_config(ROOT / "configs" / "baselines.yaml")
    names = [m.name for m in config.methods]
    assert set(names) >= {"naive", "frozen", "crma", "crma-task1", *BASELINES}
    for spec in config.methods:
        make_method(spec.name, spec.options)
    assert config.seeds == [0, 42, 1234] and len(config.corpus.order) == 5
    assert (config.corpus.train_size, config.corpus.holdout_size) == (500, 100)
