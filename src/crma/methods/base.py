"""The method protocol: how a continual-learning method plugs into the one shared trainer.

A method decides which adapter trains on a domain, which parameters are trainable, an
optional extra loss term, which examples each step trains on, what happens after a domain,
and which adapters evaluate a domain. It never branches inside the trainer. State it must keep
across domains (a Fisher matrix, a replay buffer) goes through `state_tensors` /
`load_state_tensors`, saved in the stack.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from crma.engine import Engine
from crma.settings import Settings

Example = dict[str, list[int]]  # one tokenized example: input_ids and labels (-100: no loss)


@dataclass
class Task:
    """One domain of the sequence: its position, name, and the run's seed."""

    index: int
    domain: str
    seed: int
    # Indices into the domain's examples that its optimizer steps draw, each once, in the
    # order first drawn; set by the trainer (empty: not known, e.g. outside a trainer).
    train_indices: tuple[int, ...] = ()

    def trained_examples(self, examples: list[Example]) -> list[Example]:
        """The examples this domain trains on (with `max_steps`, maybe fewer than it has)."""
        return [examples[i] for i in self.train_indices] if self.train_indices else examples

    def rng_seed(self, purpose: str) -> int:
        """A seed for `purpose` that depends only on (seed, index, domain), stable across runs."""
        key = f"{self.seed}:{self.index}:{self.domain}:{purpose}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


@dataclass
class NoOptions(Settings):
    """This method has no options."""


DOMAIN_PREFIX = "d-"


def domain_adapter(domain: str) -> str:
    """The PEFT name of `domain`'s own adapter: the domain with a `d-` prefix.

    PEFT finds an adapter's parameters by its name as a segment of their dotted names (and in
    places as a substring), so a domain named after a module (`layers`, `0`) or inside PEFT's
    prefixes (`a`, `lora`) would take other parameters; no module or PEFT name holds a '-'.
    A method's fixed adapters (`Method.fixed_adapters`) never start with the prefix.
    """
    return f"{DOMAIN_PREFIX}{domain}"


class Method:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    uses_crma: ClassVar[bool] = False  # attach a CRMA backbone to the base model
    needs_task_id: ClassVar[bool] = True  # inference must know (or route to) the domain
    per_domain_adapter: ClassVar[bool] = True  # False: one adapter learns every domain
    data_parallel: ClassVar[bool] = True  # same result on several processes (crma.distributed)
    fsdp: ClassVar[bool] = True  # trains with the base weights sharded (crma.fsdp)
    zero: ClassVar[bool] = True  # trains under DeepSpeed ZeRO-2 and ZeRO-3 (crma.zero)

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self.trained: list[str] = []  # domains finished, in order

    @classmethod
    def fixed_adapters(cls) -> tuple[str, ...]:
        """The adapter names this method uses whatever the domains (a shared adapter, a
        teacher copy); every other adapter it creates is a domain's own, `domain_adapter`."""
        return ()

    # -- per domain ----------------------------------------------------------------------
    def adapter_name(self, domain: str) -> str:
        """The PEFT adapter that learns `domain` (a fresh one per domain by default)."""
        return domain_adapter(domain)

    def adapter_folder(self, domain: str) -> str:
        """Its folder in the stack's adapters/: the domain's name, or the shared adapter's."""
        return domain if self.per_domain_adapter else self.adapter_name(domain)

    def begin_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        """Create or select the adapter for `task` and make it the active one.

        `examples` is the domain's training data, for methods that look at it before training
        (e.g. InfLoRA's input subspace). Also called again when a killed run resumes the domain.
        """
        name = self.adapter_name(task.domain)
        if name not in engine.adapters:
            engine.add_lora(name, seed=task.rng_seed("lora-init"))
        engine.activate(name)

    def trainable_groups(self, engine: Engine, task: Task) -> list[dict[str, Any]]:
        """AdamW parameter groups for this domain (learning rates filled in by the trainer)."""
        return [
            {"name": "lora", "params": engine.adapter_parameters(self.adapter_name(task.domain))}
        ]

    def extra_loss(
        self, engine: Engine, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """A regulariser added to the language-modelling loss (None: nothing)."""
        return None

    def batch_examples(self, task: Task, step: int, batch: list[Example]) -> list[Example]:
        """The examples optimizer step `step` trains on, given the new domain's `batch`.

        Replay mixes stored examples in here. The result may depend only on (task, step,
        batch) and the method's state, so that a resumed run sees the same batches (which
        examples the domain draws at all: `task.train_indices`).
        """
        return batch

    def end_task(self, engine: Engine, task: Task, examples: list[Example]) -> None:
        """After training on `examples`: update what the method keeps across domains."""
        self.trained.append(task.domain)

    # -- evaluation ----------------------------------------------------------------------
    def eval_adapters(self, domain: str) -> str | list[str] | None:
        """Adapters that answer for `domain` (oracle routing); None: base (+ backbone) only."""
        return self.adapter_name(domain) if domain in self.trained else None

    # -- persistence ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


M = TypeVar("M", bound=type[Method])
METHODS: dict[str, type[Method]] = {}  # name -> class, in registration order


def register(cls: M) -> M:
    """Class decorator that makes a method available by its `name` to `crma train`, `crma run`
    and configs (as PEFT registers its tuners). Its fixed adapters may not look like a domain's
    own, so no domain name can clash with them."""
    if cls.name in METHODS:
        raise ValueError(f"two methods named {cls.name!r}: {METHODS[cls.name]} and {cls}")
    clash = [a for a in cls.fixed_adapters() if a.startswith(DOMAIN_PREFIX)]
    if clash:
        raise ValueError(f"method {cls.name!r}: adapter {clash[0]!r} starts with {DOMAIN_PREFIX!r}")
    METHODS[cls.name] = cls
    return cls


def params_of(groups: list[dict[str, Any]]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]
