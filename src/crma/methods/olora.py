from __future__ import annotations

from dataclasses import dataclass

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SummedLoras, lora_matrices
from crma.settings import Settings, setting


@dataclass
class OloraOptions(Settings):
    """O-LoRA: orthogonal LoRA subspaces per domain."""

    lambda_1: float = setting(0.5, "weight λ1 of the orthogonality loss Σ|A_oldᵀ A_new|", ge=0)


@register
class Olora(SummedLoras):
    """O-LoRA: each domain's LoRA learns in a subspace orthogonal to the earlier domains'.

    Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning",
    Findings of EMNLP 2023 (defaults λ1 = 0.5, λ2 = 0, r = 8; r is the run's `lora.r`). A fresh
    LoRA per domain trains with all earlier LoRAs frozen but active (summed into the forward
    pass), and the loss gains λ1·Σ_layers Σ_t Σ|A_t A_newᵀ| — the sum of absolute entries of
    the overlap between the new down-projection and every earlier one, as in the authors'
    code. At inference every LoRA is active (summed): no task id. λ2 (an L2 term on the new
    LoRA) is 0 in the paper and not implemented.
    """

    name = "olora"
    Options = OloraOptions

    def __init__(self, options: OloraOptions | None = None):
        super().__init__(options)
        self._new: dict[str, torch.nn.Parameter] = {}  # module -> A_new (r, d_in), trainable
        self._old: dict[str, torch.Tensor] = {}  # module -> earlier A's stacked (Σr_t, d_in)

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().begin_task(engine, task, examples)
        self._new = lora_matrices(engine, self.adapter_name(task.domain), "lora_A")
        earlier = [lora_matrices(engine, a, "lora_A") for a in self.earlier_adapters(task)]
        self._old = (
            {m: torch.cat([e[m].detach() for e in earlier]) for m in self._new} if earlier else {}
        )

    def extra_loss(self, engine: Engine, batch, outputs) -> torch.Tensor | None:
        if not self._old:
            return None
        return self.options.lambda_1 * orthogonality_loss(self._new, self._old)


def orthogonality_loss(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_modules Σ|A_old A_newᵀ|: zero iff every new row is orthogonal to every old row.

    new[m]: (r, d_in); old[m]: (r_old, d_in) — PEFT's lora_A layout (rows span the subspace).
    """
    return sum((old[m] @ new[m].T).abs().sum() for m in new)
