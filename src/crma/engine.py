"""The in-memory continual model: a base LM, its CRMA backbone (if any), named LoRA adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from crma.adapter import CRMABackbone
from crma.settings import setting


@dataclass
class LoraSettings:
    """LoRA adapters: one per domain (or one shared, for naive)."""

    r: int = setting(8, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = setting(0.0, "LoRA dropout")
    target_modules: list[str] | None = setting(
        None, "modules to adapt; empty: PEFT's default for the architecture (q/v projections)"
    )

    def peft_config(self) -> LoraConfig:
        # Standard LoRA init (B = 0): PiSSA-style inits rewrite the shared base weights.
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules or None,
            task_type="CAUSAL_LM",
        )


class Engine:
    """Holds the model being trained and switches which adapters are active."""

    def __init__(
        self, base: nn.Module, tokenizer, lora: LoraSettings, backbone: CRMABackbone | None
    ):
        self.base, self.tokenizer, self.lora, self.backbone = base, tokenizer, lora, backbone
        self.peft: PeftModel | None = None

    @property
    def model(self) -> nn.Module:
        return self.peft if self.peft is not None else self.base

    @property
    def adapters(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    def add_lora(self, name: str, seed: int) -> None:
        """A fresh LoRA named `name`, initialised from `seed` (B = 0: starts as a no-op)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.peft is None:
                self.peft = get_peft_model(self.base, self.lora.peft_config(), adapter_name=name)
            else:
                self.peft.add_adapter(name, self.lora.peft_config())

    def load_lora(self, name: str, path: str | Path) -> None:
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.peft.load_adapter(str(path), adapter_name=name)

    def save_lora(self, name: str, directory: str | Path) -> None:
        """Write adapter `name` in PEFT format into `directory/name/`."""
        assert self.peft is not None
        self.peft.save_pretrained(str(directory), selected_adapters=[name])

    def lora_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.lora_state(name).values())

    def lora_state(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters by full name (…lora_A.<name>.weight, …lora_B.<name>.weight)."""
        if self.peft is None:
            return {}
        return {n: p for n, p in self.peft.named_parameters() if _belongs_to(n, name)}

    def set_trainable(self, params: list[nn.Parameter]) -> None:
        """Exactly `params` require grad; everything else (base, other adapters) is frozen."""
        keep = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    def activate(self, names: str | list[str] | None) -> None:
        """Route forward passes through these adapters (several are summed), or none."""
        self._active = names
        if self.peft is not None and names:
            self.peft.base_model.set_adapter(names, inference_mode=False)

    @contextmanager
    def using(self, names: str | list[str] | None) -> Iterator[None]:
        """Run a block with `names` active (None: no adapter, base + backbone only)."""
        previous = getattr(self, "_active", None)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.activate(names)
        ctx = (
            self.peft.disable_adapter() if (self.peft is not None and not names) else nullcontext()
        )
        try:
            with ctx:
                yield
        finally:
            self.activate(previous)
            self.set_trainable(trainable)

    def fingerprint(self, names: str | list[str] | None) -> str:
        """Hash of every weight that can differ between evaluations: active adapters + backbone.

        Two evaluations with equal fingerprints give identical losses, so results are reused.
        """
        digest = hashlib.sha256()
        for name in [names] if isinstance(names, str) else names or []:
            for key, tensor in sorted(self.lora_state(name).items()):
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        if self.backbone is not None and self.backbone.enabled:
            for key, tensor in sorted(self.backbone.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()


def _belongs_to(param_name: str, adapter: str) -> bool:
    parts = param_name.split(".")
    return any(a.startswith("lora_") and b == adapter for a, b in zip(parts, parts[1:]))
