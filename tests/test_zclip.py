import math

import torch

from crma import ZClip


def run_step(zclip: ZClip, param: torch.nn.Parameter, norm: float) -> dict:
    param.grad = torch.tensor([norm, 0.0])
    return zclip.step([param])


def test_clips_planted_spike_and_leaves_normal_steps():
    zclip = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None)
    param = torch.nn.Parameter(torch.zeros(2))
    # Normal steps stay within 1.5 standard deviations of their mean (sin has std 1/√2).
    normal = [1.0 + 0.05 * math.sin(i) for i in range(60)]
    for norm in normal[:40]:
        stats = run_step(zclip, param, norm)
        assert not stats["clipped"]
        assert math.isclose(param.grad.norm().item(), norm, rel_tol=1e-6)
    stats = run_step(zclip, param, 10.0)
    assert stats["clipped"] and stats["grad_norm"] == 10.0
    limit = stats["grad_norm_clipped"]
    assert 1.0 < limit < 1.5
    assert math.isclose(param.grad.norm().item(), limit, rel_tol=1e-5)
    for norm in normal[40:]:  # the spike did not poison the statistics
        assert not run_step(zclip, param, norm)["clipped"]


def test_warmup_applies_only_max_norm():
    zclip = ZClip(warmup_steps=5, max_norm=1.0)
    param = torch.nn.Parameter(torch.zeros(2))
    assert not run_step(zclip, param, 0.5)["clipped"]
    stats = run_step(zclip, param, 3.0)
    assert stats["clipped"] and math.isclose(param.grad.norm().item(), 1.0, rel_tol=1e-6)
    assert zclip.mean is None


def test_state_dict_round_trip():
    a = ZClip(warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(2))
    for norm in [0.5, 0.6, 0.55, 0.52]:
        run_step(a, param, norm)
    b = ZClip(warmup_steps=3)
    b.load_state_dict(a.state_dict())
    assert b.threshold() == a.threshold() and b.steps == a.steps


def test_in_training_each_domain_restarts_the_warm_up_so_short_domains_only_cap_at_one(
    tmp_path, monkeypatch
):
    """The trainer makes a fresh ZClip per domain. With 16 steps per domain (the paper
    protocol's) the 25-step warm-up never ends: every step's threshold is the max-norm cap of
    1, in the second domain too, where one ZClip carried across domains would have adapted."""
    from accelerate import Accelerator
    from tiny import tiny_model, tiny_tokenizer

    from crma.engine import Engine, LoraSettings
    from crma.methods import Task, make_method
    from crma.train import TrainConfig, Trainer

    thresholds, norms = [], []
    original_threshold, original_update = ZClip.threshold, ZClip._update
    monkeypatch.setattr(
        ZClip,
        "threshold",
        lambda self: thresholds.append(original_threshold(self)) or thresholds[-1],
    )
    monkeypatch.setattr(
        ZClip, "_update", lambda self, n: norms.append(n) or original_update(self, n)
    )
    engine = Engine(tiny_model(), tiny_tokenizer(), LoraSettings(r=4, alpha=8), backbone=None)
    method, config = (
        make_method("naive"),
        TrainConfig(lr=0.02, batch_size=4, max_steps=16, precision="fp32"),
    )
    gen = torch.Generator().manual_seed(0)
    for index, name in enumerate(("alpha", "beta")):
        data = [
            {"input_ids": ids, "labels": ids}
            for ids in torch.randint(10, 400, (12, 10), generator=gen).tolist()
        ]
        trainer = Trainer(engine, method, config, Accelerator(cpu=True), {})
        trainer.train_task(Task(index, name, 0), data, tmp_path / name, tmp_path / "metrics.jsonl")
    assert thresholds == [1.0] * 32

    monkeypatch.undo()
    carried, param = ZClip(max_norm=1.0), torch.nn.Parameter(torch.zeros(2))
    for norm in norms:  # the same 32 clipped norms through one ZClip
        run_step(carried, param, norm)
    assert carried.mean is not None and carried.threshold() < 1.0, "it would have adapted"


def test_record_of_a_step_clipped_elsewhere_matches_step():
    """DeepSpeed clips at `threshold()` itself and hands ZClip the norm (crma.zero): the
    statistics and the EMA then follow those of `step` clipping in place."""
    in_place, elsewhere = ZClip(warmup_steps=10), ZClip(warmup_steps=10)
    param = torch.nn.Parameter(torch.zeros(2))
    clipped_to = []
    norms = [0.5, 0.5, 0.5, 2.0, *[0.5] * 6, 0.5, 5.0, 0.5]  # exact in float32
    for norm in norms:
        stats = elsewhere.record(norm, elsewhere.threshold())
        assert stats == run_step(in_place, param, norm)
        # what it counts as the clipped norm is the norm of the gradient clipped in place
        assert math.isclose(stats["grad_norm_clipped"], param.grad.norm().item(), rel_tol=1e-6)
        clipped_to.append(stats["grad_norm_clipped"] if stats["clipped"] else None)
    assert elsewhere.state_dict() == in_place.state_dict()
    # 2.0 is cut to max_norm in warm-up, 5.0 to the adaptive threshold (below max_norm) after it
    assert [i for i, c in enumerate(clipped_to) if c is not None] == [3, 11]
    assert clipped_to[3] == 1.0 and 0.5 < clipped_to[11] < 1.0
