"""Continual-learning methods, one small class each behind the protocol in `base`."""

from __future__ import annotations

from typing import Any

from crma.errors import UserError
from crma.methods.base import Method, Task
from crma.methods.crma import Crma, CrmaTask1
from crma.methods.ewc import Ewc
from crma.methods.frozen import Frozen
from crma.methods.inflora import Inflora
from crma.methods.lwf import Lwf
from crma.methods.naive import Naive
from crma.methods.olora import Olora
from crma.methods.osf import Osf
from crma.methods.replay import Replay
from crma.settings import from_dict

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Naive, Frozen, Crma, CrmaTask1, Ewc, Replay, Lwf, Olora, Inflora, Osf)
}


def make_method(name: str, options: dict[str, Any] | None = None, where: str = "method") -> Method:
    """Instantiate method `name` with its options checked against its Options dataclass."""
    if name not in METHODS:
        raise UserError(f"{where}: unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(from_dict(cls.Options, options, f"{where} options"))


__all__ = ["METHODS", "Method", "Task", "make_method"]
