"""The CRMA backbone: a Constrained Residual Mixing Adapter on every decoder layer.

Per layer ℓ, on the layer's output hidden state h (B, T, d), with n streams:

    M  = Sinkhorn(exp(Λ / τ))             doubly stochastic, so ‖M‖₂ = 1 (Birkhoff)
    h' = h + α · W · M · (R h)            untied (default); W = 0 at init -> exact identity
    h' = h + α · Rᵀ (M − I) R h           tied: R orthonormal rows, α ≤ 1 -> non-expansive map

R = read_weights (n, d), W = write_weights (d, n), Λ = log_mix (n, n), α = exp(log_alpha).
All layers' parameters are stacked so one batched Sinkhorn serves every layer per forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crma.errors import UserError
from crma.fileio import atomic_path
from crma.settings import SettingError, Settings, from_dict, setting
from crma.sinkhorn import sinkhorn
from crma.stack import BACKBONE_CONFIG as CONFIG_FILE
from crma.stack import BACKBONE_FILE

# model_type -> dotted path of the decoder-layer ModuleList inside the *ForCausalLM model.
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
}


@dataclass
class CRMAConfig(Settings):
    """CRMA backbone: n mixing streams per decoder layer."""

    n_streams: int = setting(4, "streams n: rank of the read/write projections, size of M", ge=1)
    variant: Literal["untied", "tied"] = setting(
        "untied", "untied: h+αWM(Rh); tied: h+αRᵀ(M−I)Rh, non-expansive"
    )
    mix_init: float = setting(
        5.0, "log_mix init c·I (c≈5 gives M≈I; 0 would average streams)", ge=-100, le=100
    )
    alpha_init: float = setting(0.1, "initial gate α = exp(log_alpha)", gt=0, le=10)
    temperature: float = setting(1.0, "Sinkhorn temperature τ in M = Sinkhorn(exp(Λ/τ))", gt=0)
    sinkhorn_iters: int = setting(20, "log-space Sinkhorn warm-start iterations", ge=1)
    # The long protocol's rates (configs/long.yaml, which pins them; the paper protocol's
    # validation chose them on corpus format 1, results/tuning/long-crma.md keeps them at the
    # long length). Presets set their own protocol's choice; tests/test_defaults.py checks.
    lr_projections: float = setting(3e-4, "learning rate of read/write projections", gt=0)
    lr_mix: float = setting(3e-3, "learning rate of log_mix", gt=0)
    lr_gate: float = setting(3e-4, "learning rate of log_alpha", gt=0)


class CRMABackbone(nn.Module):
    """Stacked CRMA parameters for all L decoder layers, applied by forward hooks."""

    def __init__(self, config: CRMAConfig, n_layers: int, hidden_size: int):
        super().__init__()
        self.config, self.n_layers, self.hidden_size = config, n_layers, hidden_size
        n, d, L = config.n_streams, hidden_size, n_layers
        read = torch.stack([_orthonormal_rows(n, d, seed=layer) for layer in range(L)])
        self.read_weights = nn.Parameter(read)  # (L, n, d)
        if config.variant == "untied":
            self.write_weights = nn.Parameter(torch.zeros(L, d, n))  # (L, d, n)
        self.log_mix = nn.Parameter(config.mix_init * torch.eye(n).repeat(L, 1, 1))  # (L, n, n)
        self.log_alpha = nn.Parameter(torch.full((L,), math.log(config.alpha_init)))  # (L,)
        self.enabled = True
        self._handles: list[Any] = []
        self._step_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._frozen_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- the maths -----------------------------------------------------------------------
    def mixing_matrices(self) -> torch.Tensor:
        """M for every layer, (L, n, n) float32, rows and columns summing to 1."""
        return sinkhorn(self.log_mix.float() / self.config.temperature, self.config.sinkhorn_iters)

    def gates(self) -> torch.Tensor:
        alpha = self.log_alpha.float().exp()
        return alpha.clamp(max=1.0) if self.config.variant == "tied" else alpha  # (L,)

    def read_matrices(self) -> torch.Tensor:
        """R per layer (L, n, d); orthonormalised by QR for the tied variant."""
        if self.config.variant == "untied":
            return self.read_weights
        q, r = torch.linalg.qr(self.read_weights.transpose(-1, -2))  # (L, d, n)
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        return (q * sign).transpose(-1, -2)

    def write_matrices(self, M: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """A per layer (L, d, n) such that h' = h + A·(R h): A = α·W·M, or α·Rᵀ(M − I) if tied."""
        alpha = self.gates()[:, None, None]
        if self.config.variant == "untied":
            return alpha * (self.write_weights.float() @ M)
        eye = torch.eye(M.shape[-1], device=M.device)
        return alpha * (R.float().transpose(-1, -2) @ (M - eye))

    def _per_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, A) for this forward: one batched Sinkhorn for all layers, M folded into A.

        Constant at inference, so computed once there until the weights change.
        """
        if torch.is_grad_enabled():
            R = self.read_matrices()
            return R, self.write_matrices(self.mixing_matrices(), R)
        key = tuple((p._version, p.data_ptr(), p.device) for p in self.parameters())
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            R = self.read_matrices()
            self._frozen_cache = (key, (R, self.write_matrices(self.mixing_matrices(), R)))
        return self._frozen_cache[1]

    def mix(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Apply layer `layer`'s CRMA map to hidden states h (B, T, d)."""
        if layer == 0 or self._step_cache is None:
            self._step_cache = self._per_forward()
        R_all, A_all = self._step_cache
        return _LowRankResidual.apply(h, R_all[layer].to(h.dtype), A_all[layer].to(h.dtype))

    # -- attaching -----------------------------------------------------------------------
    def _hook(self, layer: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if not self.enabled:
                return output
            if isinstance(output, tuple):
                return (self.mix(layer, output[0]), *output[1:])
            return self.mix(layer, output)

        return hook

    def attach(self, layers: nn.ModuleList) -> None:
        if len(layers) != self.n_layers:
            raise UserError(
                f"CRMA backbone has {self.n_layers} layers; the model has {len(layers)}"
            )
        self.detach()
        self._handles = [
            layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- training and logging -------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: projections, log_mix and the gate each with their own learning rate."""
        projections = [self.read_weights] + (
            [self.write_weights] if self.config.variant == "untied" else []
        )
        c = self.config
        return [
            {"name": "crma_projections", "params": projections, "lr": c.lr_projections},
            {"name": "crma_log_mix", "params": [self.log_mix], "lr": c.lr_mix, "weight_decay": 0.0},
            {"name": "crma_gate", "params": [self.log_alpha], "lr": c.lr_gate, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def spectral_stats(self) -> dict[str, float]:
        """max_ℓ ‖M_ℓ‖₂, max |row sum − 1|, max |col sum − 1| (the fields of the spectral log)."""
        M = self.mixing_matrices()
        return {
            "spectral_norm_max": torch.linalg.matrix_norm(M, ord=2).max().item(),
            "rowsum_err_max": (M.sum(-1) - 1).abs().max().item(),
            "colsum_err_max": (M.sum(-2) - 1).abs().max().item(),
            "alpha_max": self.gates().max().item(),
        }

    # -- persistence ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """What `crma_config.json` holds: the settings and the shape the weights fit."""
        return {
            "config": dataclasses.asdict(self.config),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
        }

    def save_weights(self, path: str | Path) -> None:
        """Write the weights as safetensors (a stack commit writes them atomically)."""
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt"})

    def save(self, directory: str | Path) -> None:
        """Write crma_backbone.safetensors + crma_config.json into `directory` atomically."""
        with atomic_path(Path(directory) / BACKBONE_FILE) as tmp:
            self.save_weights(tmp)
        with atomic_path(Path(directory) / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(self.meta(), indent=2) + "\n")

    def load(self, directory: str | Path) -> None:
        """Load weights saved by `save` into `directory`."""
        self.load_files(Path(directory) / BACKBONE_FILE, Path(directory) / CONFIG_FILE)

    def load_files(self, weights: str | Path, config: str | Path) -> None:
        """Load weights and their crma_config.json; refuses a backbone of another shape or variant."""
        meta = read_backbone_meta(config)
        where = f"{config}: the backbone"
        if (meta["n_layers"], meta["hidden_size"]) != (self.n_layers, self.hidden_size):
            raise UserError(
                f"{where} is for {meta['n_layers']} layers x {meta['hidden_size']} hidden; "
                f"this model has {self.n_layers} x {self.hidden_size}"
            )
        saved = from_dict(CRMAConfig, meta["config"], str(config))
        if (saved.n_streams, saved.variant) != (self.config.n_streams, self.config.variant):
            raise UserError(
                f"{where} has n_streams={saved.n_streams}, variant={saved.variant}; "
                f"the stack expects n_streams={self.config.n_streams}, variant={self.config.variant}"
            )
        tensors = load_file(str(weights))
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
            raise UserError(f"{weights}: tensors do not fit the backbone in {Path(config).name}")
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(tensors[name].to(param))


class _LowRankResidual(torch.autograd.Function):
    """out = h + (h Rᵀ) Aᵀ for h (B, T, d), R (n, d), A (d, n).

    Saves `out` (which the next layer keeps anyway) instead of h, and recovers Rᵀ-products
    of h from out − z Aᵀ in backward: CRMA then adds only (B, T, n) of activation memory.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, R: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        z = h @ R.T  # (B, T, n)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]), A.T).view_as(h)
        ctx.save_for_backward(out, z, R, A)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, z, R, A = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (BT, d)
        z2 = z.reshape(-1, z.shape[-1])  # (BT, n)
        gA = g @ A  # (BT, n)
        grad_h = torch.addmm(g, gA, R).view_as(grad) if ctx.needs_input_grad[0] else None
        grad_A = g.T @ z2 if ctx.needs_input_grad[2] else None
        grad_R = None
        if ctx.needs_input_grad[1]:
            # gAᵀ h with h = out − z Aᵀ, without materialising h.
            grad_R = gA.T @ out.reshape(-1, out.shape[-1]) - (gA.T @ z2) @ A.T
        return grad_h, grad_R, grad_A


def read_backbone_meta(path: str | Path) -> dict[str, Any]:
    """The contents of a backbone's crma_config.json."""
    try:
        meta = json.loads(Path(path).read_bytes())
        assert isinstance(meta["n_layers"], int) and isinstance(meta["hidden_size"], int)
        assert isinstance(meta["config"], dict)
        return meta
    except FileNotFoundError:
        raise UserError(f"{path}: CRMA backbone config not found") from None
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"{path}: not a CRMA backbone config ({type(exc).__name__})") from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a supported causal LM (a PEFT wrapper is looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise UserError(
            f"unsupported architecture {model_type!r} for CRMA; supported: {', '.join(sorted(DECODER_LAYERS))}"
        )
    module: Any = inner
    for part in DECODER_LAYERS[model_type].split("."):
        module = getattr(module, part)
    return module


def hidden_size(model: nn.Module) -> int:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config.hidden_size


def check_fits(model: nn.Module, config: CRMAConfig) -> None:
    """Refuse a model CRMA cannot attach to with `config`, before anything is built."""
    decoder_layers(model)  # a supported architecture
    if config.n_streams > hidden_size(model):
        allowed = f"at most {hidden_size(model)} (the model's hidden size)"
        raise SettingError("crma.n_streams", config.n_streams, allowed)


def attach_crma(model: nn.Module, config: CRMAConfig | None = None) -> CRMABackbone:
    """Create a CRMA backbone for `model`, hook it onto every decoder layer and return it.

    The backbone is registered as `model.crma_backbone` so `.to()`, accelerate and DDP see
    its parameters; it starts as the exact identity (untied variant).
    """
    config = config or CRMAConfig()
    check_fits(model, config)
    layers = decoder_layers(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(inner.parameters())
    backbone = CRMABackbone(config, len(layers), hidden_size(model)).to(param.device)
    backbone.attach(layers)
    inner.crma_backbone = backbone
    return backbone


def _orthonormal_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """n orthonormal rows in R^d, deterministic per layer (rows of a random orthogonal matrix)."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=gen))
    return q.T.contiguous()
