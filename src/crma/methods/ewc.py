from __future__ import annotations

from dataclasses import dataclass

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SharedLora, batches
from crma.settings import Settings, setting


@dataclass
class EwcOptions(Settings):
    """Online EWC on the shared LoRA."""

    ewc_lambda: float = setting(
        1e4, "penalty strength λ on the raw empirical Fisher (no paper value: tune it)", ge=0
    )
    gamma: float = setting(
        1.0, "online EWC decay of the Fisher of older domains (1: plain sum)", ge=0, le=1
    )
    fisher_examples: int | None = setting(
        None, "training examples per domain for the Fisher (None: all of them)", ge=1
    )


@register
class Ewc(SharedLora):
    """Elastic Weight Consolidation, online variant, on one shared LoRA.

    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017;
    online EWC from Schwarz et al., "Progress & Compress", ICML 2018: one running Fisher
    F ← γ·F + F_t and one anchor θ* (the weights after the last domain), penalty
    (λ/2)·Σ F·(θ − θ*)². The Fisher is the empirical Fisher: per-example squared gradients of
    the example's mean token loss, averaged over the domain's training examples, at the end of
    the domain, used raw as both papers do. Its scale depends on the model, the loss and the
    adapter (LoRA's A has almost no Fisher while B ≈ 0), so λ has no transferable paper value:
    sweep it over several decades. (Any one global rescaling of F is only a rescaling of λ;
    a per-tensor normalisation is not, and would over-anchor tensors of tiny Fisher.)
    """

    name = "ewc"
    Options = EwcOptions

    def __init__(self, options: EwcOptions | None = None):
        super().__init__(options)
        self.fisher: dict[str, torch.Tensor] = {}  # parameter name -> F, same shape
        self.anchor: dict[str, torch.Tensor] = {}  # parameter name -> θ*
        self._params: dict[str, torch.nn.Parameter] = {}

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        super().begin_task(engine, task, examples)
        self._params = engine.adapter_state(self.name)

    def extra_loss(self, engine: Engine, batch, outputs) -> torch.Tensor | None:
        if not self.fisher:
            return None
        self._to_device(next(iter(self._params.values())).device)
        return ewc_penalty(self._params, self.fisher, self.anchor, self.options.ewc_lambda)

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        n = self.options.fisher_examples
        fisher = empirical_fisher(engine, self._params, examples[:n] if n else examples)
        self._to_device(next(iter(self._params.values())).device)
        for name, f in fisher.items():
            self.fisher[name] = (
                self.options.gamma * self.fisher[name] + f if name in self.fisher else f
            )
            self.anchor[name] = self._params[name].detach().clone()
        super().end_task(engine, task, examples)

    def _to_device(self, device: torch.device) -> None:
        for store in (self.fisher, self.anchor):
            for name, tensor in store.items():
                store[name] = tensor.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"fisher/{n}": t for n, t in self.fisher.items()},
            **{f"anchor/{n}": t for n, t in self.anchor.items()},
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher = {
            k.removeprefix("fisher/"): t for k, t in tensors.items() if k.startswith("fisher/")
        }
        self.anchor = {
            k.removeprefix("anchor/"): t for k, t in tensors.items() if k.startswith("anchor/")
        }


def ewc_penalty(
    params: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    strength: float,
) -> torch.Tensor:
    """(λ/2)·Σ_i F_i·(θ_i − θ*_i)²: zero at the anchor, quadratic in the distance from it."""
    total = sum((fisher[n] * (p - anchor[n]).pow(2)).sum() for n, p in params.items())
    return 0.5 * strength * total


def empirical_fisher(
    engine: Engine, params: dict[str, torch.nn.Parameter], examples: list[Example]
) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's mean token loss."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    counted = 0
    with engine.eval_mode():
        for batch in batches(engine, examples, batch_size=1):
            loss = engine.model(**batch).loss
            if not torch.isfinite(loss):  # no label token in this example
                continue
            grads = torch.autograd.grad(loss, list(params.values()))
            for (name, _), grad in zip(params.items(), grads, strict=True):
                fisher[name] += grad.float().pow(2)
            counted += 1
    return {n: f / max(1, counted) for n, f in fisher.items()}
