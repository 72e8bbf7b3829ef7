"""Prefilling the requests that join together: one forward pass per group of similar length,
and the chat template's head (its system prompt and the user turn's opening) taken from a
cache instead of recomputed for every request.

A group's cache holds, per row, the head's keys and values (none if the row does not start
with the head), then its remaining prompt tokens left-padded to the group's longest. The
attention mask hides the padding and `position_ids` count each row's own tokens, so a row
computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from crma.batching import pad, pad_id
from crma.routing.router import adapter_key

if TYPE_CHECKING:
    from crma.serve.snapshot import Snapshot

Adapters = str | list[str] | None


class TemplateHead:
    """The tokens every chat prompt starts with (the template up to the user's text), and
    their keys and values per adapter set, computed on first use. The adapters change the
    keys and values (LoRA on the attention projections, the CRMA backbone on every layer),
    so each adapter set has its own."""

    def __init__(self, snap: Snapshot):
        self.snap = snap
        # Only caches of plain layers can be filled ahead (not sliding windows).
        heads = [snap.model.encode(text) for text in ("a", "b")] if snap.batchable else [[]]
        self.ids = _common_prefix(heads[0], heads[-1])
        self._kv: dict[tuple[str, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def length(self, ids: list[int]) -> int:
        """How many of `ids` the cached head covers: all of it or nothing; one token at least
        is left to prefill (it gives the row's first logits)."""
        n = len(self.ids)
        return n if 0 < n < len(ids) and ids[:n] == self.ids else 0

    def kv(self, adapters: Adapters) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the head's keys and values (1, heads, length, dim) under `adapters`."""
        key = adapter_key(adapters)
        if key not in self._kv:
            cache = DynamicCache(config=self.snap.engine.base.config)
            ids = torch.tensor([self.ids])
            self.snap.logits(ids, None, torch.arange(len(self.ids))[None], cache, [adapters])
            self._kv[key] = [(layer.keys, layer.values) for layer in cache.layers]
        return self._kv[key]


def prefill(
    snap: Snapshot, head: TemplateHead, prompts: list[list[int]], adapters: list[Adapters]
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """One forward pass over prompts that share a head length: their cache, attention mask
    (B, T) and last-position logits (B, V)."""
    skip = head.length(prompts[0])
    rests, mask = pad([ids[skip:] for ids in prompts], pad_id(snap.model.tokenizer), "left")
    positions = skip + (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=snap.engine.base.config)
    if skip:
        rows = [head.kv(a) for a in adapters]
        for i, layer in enumerate(zip(*rows)):
            cache.update(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]), i)
        mask = torch.cat([torch.ones(len(prompts), skip, dtype=mask.dtype), mask], dim=1)
    logits = snap.logits(rests, mask, positions, cache, adapters)
    return cache, mask, logits


def groups(lengths: list[int], skips: Callable[[int], int], slack: float = 1.15) -> list[list[int]]:
    """Indices of prompts to prefill together: the same head length, and similar lengths so
    padding adds at most `slack` − 1 of the tokens (on a CPU, padding costs as much as tokens)."""
    out: list[list[int]] = []
    by_skip: dict[int, list[int]] = {}
    for i in range(len(lengths)):
        by_skip.setdefault(skips(i), []).append(i)
    for skip, members in by_skip.items():
        members.sort(key=lambda i: lengths[i])
        group: list[int] = []
        for i in members:
            rest = lengths[i] - skip
            if group and rest * (len(group) + 1) > slack * (
                sum(lengths[j] - skip for j in group) + rest
            ):
                out.append(group)
                group = []
            group.append(i)
        out.append(group)
    return out


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
