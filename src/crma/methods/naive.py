from __future__ import annotations

from crma.methods.base import register
from crma.methods.layouts import SharedLora


@register
class Naive(SharedLora):
    """One LoRA trained on every domain in turn: the forgetting baseline."""

    name = "naive"
