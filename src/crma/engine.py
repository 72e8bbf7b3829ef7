"""The in-memory continual model: a base LM, its CRMA backbone (if any), named PEFT adapters.

Adapters are LoRA for most methods and OSF (PEFT's Orthogonal Subspace Fine-tuning) for `osf`,
which folds each domain's update into the base weights before re-decomposing them for the next.
The engine therefore also keeps track of which base weights it has changed: they are hashed in
evaluation fingerprints and written next to the adapter, so a reopened stack is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from crma.backbone import CRMABackbone
from crma.errors import UserError
from crma.settings import Settings, setting

# Written into an adapter's folder beside PEFT's files when the adapter depends on more than
# them: base weights changed by earlier merges, and the adapter's own buffers (OSF's SVD).
ENGINE_STATE = "crma_engine_state.safetensors"
_BASE, _BUFFER = "base/", "buffer/"


def module_name(name: str) -> str | None:
    """What a target-module name allows, or None when `name` is fine."""
    return None if name.strip() else "a module name such as q_proj"


@dataclass
class LoraSettings(Settings):
    """LoRA adapters: one per domain (or one shared, for naive)."""

    r: int = setting(8, "LoRA rank", ge=1)
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)", ge=1)
    dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] | None = setting(
        None,
        "modules to adapt; empty: PEFT's default for the architecture (q/v projections)",
        check=module_name,
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


def check_targets(model: nn.Module, names: list[str] | None, key: str) -> None:
    """Refuse module names (setting `key`) that match no module of `model`, as PEFT matches
    them: the module's name or the end of its dotted path."""
    modules = dict(model.named_modules())
    for name in names or []:
        if not any(p == name or p.endswith("." + name) for p in modules):
            linear = {p.rsplit(".", 1)[-1] for p, m in modules.items() if isinstance(m, nn.Linear)}
            raise UserError(
                f"{key}: no module {name!r} in the base model; its linear layers are "
                + ", ".join(sorted(linear))
            )


class Engine:
    """Holds the model being trained and switches which adapters are active."""

    def __init__(
        self, base: nn.Module, tokenizer, lora: LoraSettings, backbone: CRMABackbone | None
    ):
        self.base, self.tokenizer, self.lora, self.backbone = base, tokenizer, lora, backbone
        self.peft: PeftModel | None = None
        self.merged: set[str] = set()  # base modules whose weight an adapter was merged into

    @property
    def model(self) -> nn.Module:
        return self.peft if self.peft is not None else self.base

    @property
    def adapters(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    # -- creating, merging, saving, loading ---------------------------------------------
    def add_adapter(self, name: str, config: PeftConfig, seed: int) -> None:
        """A fresh adapter named `name` from any PEFT config, its random init drawn from `seed`."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.peft is None:
                self.peft = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)

    def add_lora(self, name: str, seed: int) -> None:
        """A fresh LoRA named `name`, initialised from `seed` (B = 0: starts as a no-op)."""
        self.add_adapter(name, self.lora.peft_config(), seed)

    def merge_adapter(self, name: str) -> None:
        """Fold adapter `name` into the base weights and drop the PEFT wrapper (OSF, per domain).

        PEFT's merge unloads every adapter, so `name` must be the only one.
        """
        if self.adapters != [name]:
            raise RuntimeError(f"merge_adapter({name!r}): needs it alone, have {self.adapters}")
        assert self.peft is not None
        touched = {path for path, _ in self._tuner_layers(name)}
        merged = self.peft.merge_and_unload(adapter_names=[name])
        assert merged is self.base, "PEFT merged into another model object"
        self.peft = None
        self.merged |= touched

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` without merging it (the base weights stay as they are)."""
        assert self.peft is not None
        if self.adapters == [name]:
            self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    def save_adapter(self, name: str, folder: str | Path) -> None:
        """Write adapter `name` in PEFT format into `folder` (plain `peft` loads it from there),
        plus what it rests on."""
        assert self.peft is not None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
            self.peft.save_pretrained(scratch, selected_adapters=[name])
            for file in (Path(scratch) / name).iterdir():  # PEFT nests non-default adapters
                os.replace(file, folder / file.name)
        _sort_target_modules(folder / "adapter_config.json")
        extra = self._engine_state(name)
        if extra:
            save_file(extra, str(folder / ENGINE_STATE))

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an adapter written by `save_adapter` (base weights it rests on first)."""
        extra_file = Path(path) / ENGINE_STATE
        extra = load_file(str(extra_file)) if extra_file.is_file() else {}
        self._restore_base(extra)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
        else:
            self.peft.load_adapter(str(path), adapter_name=name)
        self._restore_buffers(name, extra)

    # -- parameters -------------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters by full name, whatever the PEFT method.

        LoRA: …lora_A.<name>.weight, …lora_B.<name>.weight; OSF: …osf_svd_params.<name>.U_low,
        S_low, V_low. Found through each PEFT layer's own list of adapter attributes.
        """
        if self.peft is None:
            return {}
        kinds = self._layer_attributes("adapter_layer_names")
        return {n: p for n, p in self.peft.named_parameters() if _belongs_to(n, name, kinds)}

    def adapter_buffers(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s non-trainable tensors (OSF: the frozen SVD factors); LoRA has none."""
        if self.peft is None:
            return {}
        kinds = self._layer_attributes("other_param_names")
        return {n: b for n, b in self.peft.named_buffers() if _belongs_to(n, name, kinds)}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_state(name).values())

    def added_parameters(self) -> set[nn.Parameter]:
        """What crma adds to the base: every adapter's parameters and the backbone's. Sharding
        (crma.fsdp, crma.zero) keeps these whole on every process."""
        added = {p for name in self.adapters for p in self.adapter_parameters(name)}
        return added | (set(self.backbone.parameters()) if self.backbone is not None else set())

    def set_trainable(self, params: list[nn.Parameter]) -> None:
        """Exactly `params` require grad; everything else (base, other adapters) is frozen."""
        keep = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    # -- routing forward passes ---------------------------------------------------------------
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

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        """No dropout inside the block (evaluation, statistics of the data, teacher outputs)."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)

    @contextmanager
    def backbone_on(self, on: bool) -> Iterator[None]:
        """The CRMA backbone switched on or off inside the block (no-op without one)."""
        if self.backbone is None:
            yield
            return
        before = self.backbone.enabled
        self.backbone.enabled = on
        try:
            yield
        finally:
            self.backbone.enabled = before

    @contextmanager
    def inference(
        self, adapters: str | list[str] | None, backbone: bool = True
    ) -> Iterator[nn.Module]:
        """Forward passes that train nothing: eval mode, `adapters` active (None: none), the
        CRMA backbone on or off; all restored after. Yields the model to call."""
        with self.eval_mode(), self.backbone_on(backbone), self.using(adapters):
            yield self.model

    def fingerprint(self, names: str | list[str] | None) -> str:
        """Hash of every weight that can differ between evaluations.

        The active adapters' parameters and buffers, base weights changed by merges, and the
        backbone. Two evaluations with equal fingerprints give identical losses, so results
        are reused; base weights no merge touched are the same in every evaluation.
        """
        digest = hashlib.sha256()
        tensors: list[tuple[str, torch.Tensor]] = []
        for name in [names] if isinstance(names, str) else names or []:
            tensors += sorted({**self.adapter_state(name), **self.adapter_buffers(name)}.items())
        tensors += [(f"{_BASE}{p}", self.base_weight(p)) for p in sorted(self.merged)]
        if self.backbone is not None and self.backbone.enabled:
            tensors += sorted(self.backbone.state_dict().items())
        for key, tensor in tensors:
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    # -- helpers --------------------------------------------------------------------------
    def base_weight(self, module_path: str) -> torch.Tensor:
        """The base weight of the module at `module_path` (inside a PEFT layer if wrapped)."""
        module = self.base.get_submodule(module_path)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        return module.weight

    def _tuner_layers(self, name: str) -> Iterator[tuple[str, BaseTunerLayer]]:
        """(module path in the base model, PEFT layer) for every layer holding adapter `name`."""
        assert self.peft is not None
        for path, module in self.base.named_modules():
            if isinstance(module, BaseTunerLayer) and any(
                name in getattr(module, attr) for attr in module.adapter_layer_names
            ):
                yield path, module

    def _layer_attributes(self, kind: str) -> set[str]:
        assert self.peft is not None
        return {
            attr
            for module in self.peft.modules()
            if isinstance(module, BaseTunerLayer)
            for attr in getattr(module, kind)
        }

    def _engine_state(self, name: str) -> dict[str, torch.Tensor]:
        state = {f"{_BASE}{p}": self.base_weight(p) for p in sorted(self.merged)}
        state |= {f"{_BUFFER}{k}": b for k, b in self.adapter_buffers(name).items()}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def _restore_base(self, extra: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in extra.items():
                if key.startswith(_BASE):
                    path = key.removeprefix(_BASE)
                    self.base_weight(path).copy_(tensor)
                    self.merged.add(path)

    def _restore_buffers(self, name: str, extra: dict[str, torch.Tensor]) -> None:
        buffers = self.adapter_buffers(name)
        with torch.no_grad():
            for key, tensor in extra.items():
                if key.startswith(_BUFFER):
                    buffers[key.removeprefix(_BUFFER)].copy_(tensor)


def _sort_target_modules(config_file: Path) -> None:
    """PEFT writes `target_modules` from a set, in the order of this process's string hashes:
    sorted, the same adapter gives the same bytes in every process (resumed runs included)."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))  # PEFT's layout


def _belongs_to(param_name: str, adapter: str, kinds: set[str]) -> bool:
    """`…<kind>.<adapter>…` where kind is one of a PEFT layer's adapter attributes."""
    parts = param_name.split(".")
    return any(a in kinds and b == adapter for a, b in zip(parts, parts[1:]))
