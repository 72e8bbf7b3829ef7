"""Each row of a batch through its own LoRA adapter, with hooks registered once per snapshot.

PEFT's `adapter_names` argument does the same, but on every call it walks every module twice
and registers (then removes) a hook on each LoRA layer, and each layer then scans the names
once per adapter and copies every adapter's rows out and back: a decode step of the embedded
model spends about a sixth of its time there. Here each layer computes its base output alone
(PEFT's own path for rows named '__base__'), and a forward hook adds each adapter's update to
its rows, grouped once per forward: x Aᵀ Bᵀ · scaling, PEFT's arithmetic for plain LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from crma.generate import BASE


class RowAdapters:
    """Per-row LoRA adapters for one model's plain LoRA linear layers."""

    def __init__(self, layers: list[LoraLinear]):
        self._base_names: list[str] | None = None  # every row '__base__': the base output
        self._plan: list[tuple[str, torch.Tensor | None]] = []  # adapter, its rows (None: all)
        for layer in layers:
            layer.register_forward_pre_hook(self._base_only, with_kwargs=True)
            layer.register_forward_hook(self._add_updates)

    @classmethod
    def attach(cls, model: nn.Module) -> RowAdapters | None:
        """Hooks on `model`'s LoRA layers; None unless all adapter layers are plain LoRA
        linear layers (no DoRA or other variants, no embeddings): PEFT's own path then."""
        tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        plain = all(type(m) is LoraLinear and not m.lora_variant for m in tuners)
        return cls(tuners) if tuners and plain else None

    @contextmanager
    def using(self, names: list[str]) -> Iterator[None]:
        """Forward passes inside the block send row i through adapter `names[i]`."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        self._plan = [
            (name, None if len(index) == len(names) else torch.tensor(index))
            for name, index in rows.items()
            if name != BASE
        ]
        self._base_names = [BASE] * len(names)
        try:
            yield
        finally:
            self._base_names, self._plan = None, []

    def _base_only(self, _layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._base_names is not None:
            kwargs["adapter_names"] = self._base_names
        return args, kwargs

    def _add_updates(self, layer: LoraLinear, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        for name, index in self._plan:
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            rows = x if index is None else x.index_select(0, index)
            update = F.linear(F.linear(rows.to(a.dtype), a), b) * layer.scaling[name]
            if index is None:
                output += update.to(output.dtype)
            else:
                output.index_add_(0, index, update.to(output.dtype))
