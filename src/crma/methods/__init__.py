"""Continual-learning methods, one small class each behind the protocol in `base`.

Each registers itself with `@register` next to its class; importing a module registers its
methods, and the import order below is the order commands and errors list them in.
"""

from __future__ import annotations

from typing import Any

# isort: off
from crma.methods import naive, frozen, crma, ewc, replay, lwf, olora, inflora, osf  # noqa: F401

# isort: on
from crma.errors import UserError
from crma.methods.base import METHODS, Method, Task, register
from crma.settings import from_dict


def make_method(name: str, options: dict[str, Any] | None = None, where: str = "method") -> Method:
    """Instantiate method `name` with its options checked against its Options dataclass."""
    if name not in METHODS:
        raise UserError(f"{where}: unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(from_dict(cls.Options, options, f"{where} options"))


__all__ = ["METHODS", "Method", "Task", "make_method", "register"]
