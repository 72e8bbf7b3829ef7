from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SharedLora
from crma.settings import Settings, setting

TEACHER = "lwf_teacher"  # in-memory copy of the shared LoRA as it was before this domain


@dataclass
class LwfOptions(Settings):
    """Learning without Forgetting on the shared LoRA."""

    weight: float = setting(1.0, "weight λ_o of the distillation term", ge=0)
    temperature: float = setting(2.0, "softmax temperature T of teacher and student", gt=0)


@register
class Lwf(SharedLora):
    """Learning without Forgetting: distil the model as it was before this domain into itself.

    Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017 (defaults λ_o = 1,
    T = 2), with Hinton et al.'s T²-scaled KL. Before each domain after the first, the shared
    LoRA is copied into a frozen teacher adapter; each training batch (the new domain's inputs)
    then also runs through the teacher, and the loss gains
    λ_o·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the positions that
    predict a real token. For a causal LM the "old task outputs" are the next-token
    distributions over the whole vocabulary. The first domain has nothing to preserve and no
    distillation. Cost: one extra forward pass per step and one LoRA copy in memory.
    """

    name = "lwf"
    Options = LwfOptions
    data_parallel = False  # the KL is a mean over each process's positions, not the batch's

    @classmethod
    def fixed_adapters(cls) -> tuple[str, ...]:
        return (*super().fixed_adapters(), TEACHER)

    def __init__(self, options: LwfOptions | None = None):
        super().__init__(options)
        self._distil = False

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().begin_task(engine, task, examples)
        self._distil = any(d != task.domain for d in self.trained)
        if self._distil:
            snapshot(engine, self.name, TEACHER)
            engine.activate(self.name)

    def extra_loss(self, engine: Engine, batch, outputs) -> torch.Tensor | None:
        if not self._distil:
            return None
        with torch.no_grad(), engine.inference(TEACHER) as model:
            teacher = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        mask = batch["attention_mask"][:, 1:].bool()  # positions that predict a real token
        kl = distillation_loss(
            outputs.logits[:, :-1], teacher[:, :-1], mask, self.options.temperature
        )
        return self.options.weight * kl


def snapshot(engine: Engine, source: str, target: str) -> None:
    """Copy adapter `source`'s weights into adapter `target` (created if missing)."""
    if target not in engine.adapters:
        engine.add_lora(target, seed=0)
    weights = engine.adapter_state(target)
    with torch.no_grad():
        for name, param in engine.adapter_state(source).items():
            weights[name.replace(f".{source}.", f".{target}.")].copy_(param)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the positions in `mask`.

    student, teacher: (B, T, V) logits; mask: (B, T) bool.
    """
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    if s.shape[0] == 0:
        return student.sum() * 0.0
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
