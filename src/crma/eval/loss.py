"""Held-out loss: mean token cross-entropy over label tokens, the unit of the loss matrix, and
the one next-token negative log-likelihood every scorer (loss matrix, loss router, QA) uses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from crma.batching import collate, shard
from crma.engine import Engine


def sequence_nll(
    logits: torch.Tensor, labels: torch.Tensor, reduction: Literal["none", "mean", "sum"]
) -> torch.Tensor:
    """Negative log-likelihood of each next token: logits (B, T, V) at position t predict
    labels[:, t + 1]; labels -100 count for nothing.

    none: (B, T-1) per token (0 where ignored); mean: (B,) each sequence's mean over its
    counted tokens; sum: the total over the batch (a scalar).
    """
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B·(T-1), V)
    targets = labels[:, 1:]
    if reduction == "sum":
        return F.cross_entropy(flat, targets.reshape(-1), reduction="sum")
    nll = F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)
    if reduction == "none":
        return nll
    return nll.sum(1) / (targets != -100).sum(1)


@torch.no_grad()
def mean_token_loss(
    engine: Engine,
    examples: list[dict[str, list[int]]],
    adapters: str | list[str] | None,
    batch_size: int = 8,
    accelerator=None,
) -> float:
    """Token-weighted mean cross-entropy of `examples` with `adapters` active (nats/token)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    mine = shard(by_length, rank, world)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    with engine.inference(adapters) as model:
        for start in range(0, len(mine), batch_size):
            batch = collate(
                [examples[i] for i in mine[start : start + batch_size]],
                engine.tokenizer.pad_token_id,
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            ctx = accelerator.autocast() if accelerator else torch.autocast("cpu", enabled=False)
            with ctx:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = sequence_nll(logits, batch["labels"], "sum")
            tokens = (batch["labels"][:, 1:] != -100).sum()
            total += torch.stack([loss.double(), tokens.double()])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
