"""Adapter layouts that several baselines share, and helpers to read LoRA matrices by layer.

- `SharedLora`: one LoRA, named after the method, trained on every domain (like naive);
  EWC, replay and LwF regularise it. No task id at inference.
- `SummedLoras`: a fresh LoRA per domain; earlier ones stay frozen but active, so each new
  LoRA trains on top of the sum, and inference sums them all (O-LoRA, InfLoRA). No task id.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from crma.batching import collate
from crma.engine import Engine
from crma.methods.base import Example, Method, Task


class SharedLora(Method):
    needs_task_id = False
    per_domain_adapter = False

    @classmethod
    def fixed_adapters(cls) -> tuple[str, ...]:
        return (cls.name,)

    def adapter_name(self, domain: str) -> str:
        return self.name

    def eval_adapters(self, domain: str) -> str | None:
        return self.name if self.trained else None


class SummedLoras(Method):
    needs_task_id = False

    def earlier_adapters(self, task: Task) -> list[str]:
        """Adapters of the domains learnt before `task`, in training order."""
        return [self.adapter_name(d) for d in self.trained if d != task.domain]

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().begin_task(engine, task, examples)
        engine.activate([*self.earlier_adapters(task), self.adapter_name(task.domain)])

    def eval_adapters(self, domain: str) -> list[str] | None:
        return [self.adapter_name(d) for d in self.trained] or None


def lora_matrices(engine: Engine, adapter: str, kind: str) -> dict[str, nn.Parameter]:
    """Adapter `adapter`'s `kind` ('lora_A' or 'lora_B') weights keyed by adapted module path.

    PEFT shapes: lora_A (r, d_in) is the down-projection, lora_B (d_out, r) the up-projection.
    """
    marker = f".{kind}.{adapter}."
    return {
        name.split(marker)[0]: param
        for name, param in engine.adapter_state(adapter).items()
        if marker in name
    }


def batches(
    engine: Engine, examples: list[Example], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `examples`, in order, on the model's device."""
    device = next(engine.model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], engine.tokenizer.pad_token_id)
        yield {k: v.to(device) for k, v in batch.items()}
