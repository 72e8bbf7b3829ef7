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
