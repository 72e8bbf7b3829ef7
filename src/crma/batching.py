"""Deterministic batches: the order depends only on the seed, so a resumed run sees the same data."""

from __future__ import annotations

import math

import torch


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists for `steps` batches: successive seeded permutations, cut into batches."""
    gen = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def steps_for(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / batch_size))


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded labels are -100 and masked out."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch (DDP averages the gradients back)."""
    return indices[rank::world]
