"""CRMA backbone: identity at init, exact double stochasticity, gradients, persistence."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import FAMILIES, tiny_model

from crma import CRMAConfig, UserError, attach_crma, sinkhorn
from crma.backbone import CRMABackbone

IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_sinkhorn(logits: torch.Tensor, iters: int = 5000) -> torch.Tensor:
    """Plain alternating normalisation in float64, run to convergence (independent reference)."""
    p = logits.double().exp()
    for _ in range(iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


def train_steps(model, backbone, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def train_backbone_only(model, backbone) -> None:
    """A few steps on the backbone alone (the base frozen), then eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in backbone.parameters():
        p.requires_grad_(True)
    model.train()
    train_steps(model, backbone)
    model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_and_when_disabled(family):
    model = tiny_model(family)
    base = logits(model)
    backbone = attach_crma(model)
    assert (logits(model) - base).abs().max() < 1e-5
    train_backbone_only(model, backbone)
    assert (logits(model) - base).abs().max() > 1e-4, "training must change the output"
    backbone.enabled = False
    assert (logits(model) - base).abs().max() < 1e-5


def test_tied_variant_is_non_expansive():
    torch.manual_seed(0)
    bb = CRMABackbone(CRMAConfig(variant="tied", alpha_init=0.9), n_layers=3, hidden_size=32)
    with torch.no_grad():
        bb.log_mix.normal_(0, 3)
        bb.read_weights.normal_()
    h = torch.randn(4, 7, 32)
    for layer in range(3):
        out = bb.mix(layer, h)
        assert (out.norm(dim=-1) <= h.norm(dim=-1) * (1 + 1e-5)).all()
        assert not torch.allclose(out, h)
    R = bb.read_matrices()
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(4).expand(3, 4, 4), atol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 5.0, 20.0, 50.0])
def test_sinkhorn_is_doubly_stochastic(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    x = (torch.rand(500, 4, 4, generator=gen) * 2 - 1) * scale
    M = sinkhorn(x)
    assert M.dtype == torch.float32
    assert (M >= 0).all()
    assert (M.sum(-1) - 1).abs().max() < 1e-5
    assert (M.sum(-2) - 1).abs().max() < 1e-5
    assert (torch.linalg.matrix_norm(M, ord=2) - 1).abs().max() < 1e-5


def test_sinkhorn_matches_reference_value_and_gradient():
    x = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 4, 4, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((sinkhorn(x).double() * weights).sum(), x)
    (g_ref,) = torch.autograd.grad((reference_sinkhorn(x) * weights).sum(), x)
    assert torch.allclose(sinkhorn(x).double(), reference_sinkhorn(x), atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_stays_doubly_stochastic_under_large_learning_rate():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = attach_crma(model)
    opt = torch.optim.AdamW(backbone.parameters(), lr=1.0)
    model.train()
    for _ in range(50):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        stats = backbone.spectral_stats()
        assert abs(stats["spectral_norm_max"] - 1) < 1e-5
        assert stats["rowsum_err_max"] < 1e-5 and stats["colsum_err_max"] < 1e-5
    assert backbone.log_mix.detach().abs().max() > 6, "large steps should move the logits far"


def test_gradients_reach_crma_not_base_and_parameter_count():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = attach_crma(model)
    L, n, d = 2, 4, 64
    assert sum(p.numel() for p in backbone.parameters()) == L * (2 * n * d + n * n + 1)
    model.train()
    train_steps(model, backbone, steps=1)  # W leaves zero, so every parameter now gets gradient
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    base = [p for n_, p in model.named_parameters() if "crma_backbone" not in n_]
    assert all(p.grad is None for p in base)


def test_composes_with_peft_lora():
    model = tiny_model("llama")
    base = logits(model)
    backbone = attach_crma(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in backbone.parameters():
        p.requires_grad_(True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("crma_backbone" in n for n in trainable)
    assert all("lora_" in n or "crma_backbone" in n for n in trainable)
    assert (logits(peft_model) - base).abs().max() < 1e-5
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    train_steps(peft_model, backbone, steps=2)
    after = dict(peft_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    backbone = attach_crma(model)
    train_backbone_only(model, backbone)
    expected = logits(model)
    backbone.save(tmp_path)
    fresh = tiny_model("llama")
    attach_crma(fresh).load(tmp_path)
    assert torch.equal(logits(fresh), expected)

    other = tiny_model("gpt2")
    with pytest.raises(UserError, match="backbone is for 2 layers x 64 hidden"):
        CRMABackbone(CRMAConfig(), n_layers=3, hidden_size=64).load(tmp_path)
    with pytest.raises(UserError, match="n_streams=4"):
        attach_crma(other, CRMAConfig(n_streams=2)).load(tmp_path)


def test_unknown_architecture_fails_clearly():
    with pytest.raises(UserError, match="unsupported architecture 'bert'.*llama"):
        from transformers import BertConfig, BertForMaskedLM

        attach_crma(
            BertForMaskedLM(
                BertConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
                )
            )
        )


def test_param_groups_have_separate_learning_rates():
    backbone = CRMABackbone(CRMAConfig(lr_projections=1e-3, lr_mix=5e-2, lr_gate=2e-3), 2, 16)
    groups = {g["name"]: g for g in backbone.param_groups()}
    assert groups["crma_log_mix"]["lr"] == 5e-2 and groups["crma_gate"]["lr"] == 2e-3
    assert groups["crma_projections"]["lr"] == 1e-3
    ids = {id(p) for g in groups.values() for p in g["params"]}
    assert ids == {id(p) for p in backbone.parameters()}


def test_low_rank_residual_gradients_match_plain_autograd():
    from crma.backbone import _LowRankResidual

    gen = torch.Generator().manual_seed(3)
    h, R, A = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in [(2, 5, 8), (3, 8), (8, 3)]
    )
    torch.autograd.gradcheck(
        _LowRankResidual.apply, (h.requires_grad_(), R.requires_grad_(), A.requires_grad_())
    )
    out = _LowRankResidual.apply(h, R, A)
    assert torch.allclose(out, h + (h @ R.T) @ A.T)
