from __future__ import annotations

from crma.methods.base import Method


class Naive(Method):
    """One LoRA trained on every domain in turn: the forgetting baseline."""

    name = "naive"
    needs_task_id = False

    def adapter_name(self, domain: str) -> str:
        return "naive"

    def eval_adapters(self, domain: str) -> str | None:
        return "naive" if self.trained else None
