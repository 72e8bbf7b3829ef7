from __future__ import annotations

from dataclasses import dataclass

import torch

from crma.engine import Engine
from crma.methods.base import Example, Task, register
from crma.methods.layouts import SharedLora
from crma.settings import Settings, setting


@dataclass
class ReplayOptions(Settings):
    """Experience replay on the shared LoRA."""

    per_domain: int = setting(
        50, "examples kept per earlier domain (reservoir sample of those it trained on)", ge=0
    )
    ratio: float = setting(
        1.0, "replayed examples added per new example in each batch (1: as many as new ones)", ge=0
    )


@register
class Replay(SharedLora):
    """Experience replay: a small episodic memory of earlier domains, mixed into every batch.

    Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019 (ER): the stream
    of examples a domain trains on passes through a reservoir sampler (Vitter's Algorithm R)
    that keeps `per_domain` of them; while training a later domain, every batch of B new
    examples gets round(ratio·B) examples drawn from the memory appended (ER's default is a
    memory batch as large as the new one, ratio 1, which doubles the tokens per step).

    Only examples the domain actually trained on enter the memory: with `max_steps` a domain
    may train on fewer examples than it has (the paper protocol: 16 × 8 = 128 of 500), and
    storing unseen ones would give replay extra data of earlier domains that no other method
    gets. The stream is the trainer's (`Task.train_indices`: each distinct example once, in
    the order first drawn), a function of the seed, so a resumed domain keeps the same memory.
    All draws are seeded by (seed, domain, step). The memory holds token ids, not text, and
    lives in the stack's method state.
    """

    name = "replay"
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions | None = None):
        super().__init__(options)
        self.memory: dict[str, list[Example]] = {}  # domain -> its kept examples

    def batch_examples(self, task: Task, step: int, batch: list[Example]) -> list[Example]:
        pool = [
            e
            for domain in sorted(self.memory)
            if domain != task.domain
            for e in self.memory[domain]
        ]
        k = min(len(pool), round(self.options.ratio * len(batch)))
        if k == 0:
            return batch
        gen = torch.Generator().manual_seed(task.rng_seed(f"replay:{step}"))
        return batch + [pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()]

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        stream = task.trained_examples(examples)
        keep = reservoir_sample(len(stream), self.options.per_domain, task.rng_seed("reservoir"))
        self.memory[task.domain] = [stream[i] for i in keep]
        super().end_task(engine, task, examples)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for domain, kept in self.memory.items():
            out[f"memory/{domain}/lengths"] = torch.tensor([len(e["input_ids"]) for e in kept])
            for field in ("input_ids", "labels"):
                out[f"memory/{domain}/{field}"] = torch.tensor([t for e in kept for t in e[field]])
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory = {}
        for key in tensors:
            if key.startswith("memory/") and key.endswith("/lengths"):
                domain = key.removeprefix("memory/").removesuffix("/lengths")
                lengths = tensors[key].tolist()
                ids, labels = (
                    tensors[f"memory/{domain}/{f}"].split(lengths) for f in ("input_ids", "labels")
                )
                self.memory[domain] = [
                    {"input_ids": i.tolist(), "labels": lab.tolist()}
                    for i, lab in zip(ids, labels, strict=True)
                ]


def reservoir_sample(n_items: int, k: int, seed: int) -> list[int]:
    """Algorithm R (Vitter 1985): a uniform k-subset of a stream of n items, in one pass."""
    gen = torch.Generator().manual_seed(seed)
    kept = list(range(min(k, n_items)))
    for i in range(k, n_items):
        j = int(torch.randint(i + 1, (1,), generator=gen))
        if j < k:
            kept[j] = i
    return kept
