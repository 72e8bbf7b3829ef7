"""L2-SP as a crma method: one shared LoRA pulled back towards its weights after the previous
domain (Li et al., "Explicit inductive bias for transfer learning", ICML 2018). The example of
docs/adding-a-method.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SharedLora
from crma.settings import Settings, setting


@dataclass
class L2spOptions(Settings):
    """L2-SP's one option."""

    strength: float = setting(0.01, "weight of the squared distance to the anchor", ge=0)


@register
class L2sp(SharedLora):
    """One LoRA for every domain, pulled towards its weights after the previous domain."""

    name = "l2sp"
    Options = L2spOptions

    def __init__(self, options: L2spOptions | None = None):
        super().__init__(options)
        self.anchor: dict[str, torch.Tensor] = {}  # the LoRA after the previous domain

    def extra_loss(self, engine: Engine, batch, outputs) -> torch.Tensor | None:
        if not self.anchor:
            return None  # the first domain has nothing to keep
        params = engine.adapter_state(self.name)
        return self.options.strength * sum(
            ((p - self.anchor[n]) ** 2).sum() for n, p in params.items()
        )

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().end_task(engine, task, examples)
        self.anchor = {n: p.detach().clone() for n, p in engine.adapter_state(self.name).items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.anchor)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.anchor = dict(tensors)
