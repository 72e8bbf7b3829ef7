"""Held-out loss: mean token cross-entropy over label tokens, the unit of the loss matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crma.batching import collate, shard
from crma.engine import Engine


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
    model = engine.model
    was_training = model.training
    model.eval()
    with engine.using(adapters):
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
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                reduction="sum",
            )
            total += torch.stack([loss.double(), (labels != -100).sum().double()])
    model.train(was_training)
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
