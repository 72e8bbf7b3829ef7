"""Choosing each row's next token: greedy, or sampled with temperature and nucleus top_p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def generator(sampling: Sampling, index: int) -> torch.Generator | None:
    """A seeded generator per sampled choice, so a seed gives the same text in any batch."""
    if sampling.temperature <= 0:
        return None
    seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return torch.Generator().manual_seed(seed + index)


def sample(logits: torch.Tensor, rows: list[tuple[Sampling, torch.Generator | None]]) -> list[int]:
    """Next token per row (its sampling settings and generator): greedy rows take the argmax;
    sampled rows draw with temperature and nucleus top_p."""
    chosen = logits.argmax(-1).tolist()
    for i, (s, row_generator) in enumerate(rows):
        if s.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set >= top_p
            probs = probs.index_fill(0, order[outside], 0.0)
        chosen[i] = int(torch.multinomial(probs, 1, generator=row_generator))
    return chosen


def holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not to stream yet: an unfinished UTF-8 character, or
    the start of a stop string."""
    if text.endswith("\ufffd"):
        return 1
    return max(
        (
            k
            for s in stops
            for k in range(min(len(s) - 1, len(text)), 0, -1)
            if text.endswith(s[:k])
        ),
        default=0,
    )
