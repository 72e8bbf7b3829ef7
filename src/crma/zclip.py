"""ZClip: adaptive gradient clipping by z-score of the gradient norm (Kumar et al., 2025).

An EMA tracks the mean and variance of the total gradient norm. A step whose norm has a
z-score above `z_thresh` is clipped down to mean + z_thresh·std; the EMA is then updated with
the clipped norm, so one spike does not inflate the statistics. During warm-up only the
fixed `max_norm` cap applies while the statistics are collected.

The trainer starts a fresh ZClip for every domain, so the statistics never carry over: a
domain of at most `warmup_steps` (25) steps is clipped at `max_norm` alone and never
adaptively. The paper protocol trains 16 steps per domain, so in every run it configures ZClip
is max-norm clipping at 1 (tests/test_zclip.py shows it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class ZClip:
    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = 1.0,
    ):
        self.alpha, self.z_thresh, self.warmup_steps, self.max_norm = (
            alpha,
            z_thresh,
            warmup_steps,
            max_norm,
        )
        self.mean: float | None = None
        self.var: float = 0.0
        self.steps = 0
        self._warmup_norms: list[float] = []

    def threshold(self) -> float | None:
        """The norm above which the next step is clipped (None: only max_norm applies)."""
        if self.mean is None:
            return self.max_norm
        adaptive = self.mean + self.z_thresh * math.sqrt(self.var)
        return adaptive if self.max_norm is None else min(adaptive, self.max_norm)

    def step(self, parameters: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Clip the gradients of `parameters` in place; return the statistics to log."""
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item() if params else 0.0
        limit = self.threshold()
        clipped = norm
        if math.isfinite(norm) and limit is not None and norm > limit:
            torch.nn.utils.clip_grads_with_norm_(params, limit, torch.tensor(norm))
            clipped = limit
        self._update(clipped)
        return {
            "grad_norm": norm,
            "grad_norm_clipped": clipped,
            "zclip_mean": self.mean,
            "zclip_std": math.sqrt(self.var) if self.mean is not None else None,
            "clipped": clipped < norm,
        }

    def _update(self, norm: float) -> None:
        self.steps += 1
        if not math.isfinite(norm):
            return
        if self.mean is None:
            self._warmup_norms.append(norm)
            if len(self._warmup_norms) >= self.warmup_steps:
                t = torch.tensor(self._warmup_norms, dtype=torch.float64)
                self.mean, self.var = t.mean().item(), t.var(unbiased=False).item()
            return
        self.mean = self.alpha * self.mean + (1 - self.alpha) * norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (norm - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "var": self.var,
            "steps": self.steps,
            "warmup_norms": list(self._warmup_norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.steps = state["mean"], state["var"], state["steps"]
        self._warmup_norms = list(state["warmup_norms"])


def unclipped(parameters: Iterable[torch.Tensor]) -> dict[str, float]:
    """The statistics `ZClip.step` logs, for training without clipping."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return {"grad_norm": norm.item(), "grad_norm_clipped": norm.item()}
