from __future__ import annotations

from crma.methods.base import Method, register


@register
class Frozen(Method):
    """A fresh LoRA per domain, earlier ones frozen, no shared state: drift 0 by construction."""

    name = "frozen"
