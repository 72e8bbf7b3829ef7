from __future__ import annotations

from crma.methods.layouts import SharedLora


class Naive(SharedLora):
    """One LoRA trained on every domain in turn: the forgetting baseline."""

    name = "naive"
