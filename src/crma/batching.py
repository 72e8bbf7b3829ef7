"""Deterministic batches: the order depends only on the seed, so a resumed run sees the same data."""

from __future__ import annotations

import math
from typing import Literal

import torch
from transformers import DynamicCache


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists for `steps` batches: successive seeded permutations, cut into batches."""
    gen = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def first_drawn(order: list[list[int]]) -> tuple[int, ...]:
    """Each index of `order` once, in the order first drawn: the examples a domain trains on."""
    return tuple(dict.fromkeys(i for batch in order for i in batch))


def steps_for(n_examples: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * n_examples / batch_size))


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its end of text."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def pad(
    ids_list: list[list[int]], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists padded to the longest, ids and attention mask (B, T). Left padding is for
    generation, which appends on the right of every row."""
    width = max(len(ids) for ids in ids_list)
    ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), width), dtype=torch.long)
    for row, seq in enumerate(ids_list):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def select_rows(cache: DynamicCache, rows: list[int]) -> None:
    """Keep (or repeat) these batch rows of a KV cache, in this order, in place."""
    index = torch.tensor(rows)
    for layer in cache.layers:
        layer.batch_select_indices(index)


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded labels are -100 and masked out."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch (DDP averages the gradients back)."""
    return indices[rank::world]
