"""The batch's KV cache: new rows join by left padding (rows leave by
`crma.batching.select_rows`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(cache: DynamicCache, mask, new: DynamicCache, new_mask) -> tuple[DynamicCache, Any]:
    """One cache for both batches, each left-padded to the longer one."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, other in zip(cache.layers, new.layers):
        layer.keys = torch.cat([left_pad(layer.keys, width, 2), left_pad(other.keys, width, 2)])
        layer.values = torch.cat(
            [left_pad(layer.values, width, 2), left_pad(other.values, width, 2)]
        )
    return cache, torch.cat([left_pad(mask, width, 1), left_pad(new_mask, width, 1)])
