from __future__ import annotations

from typing import Any

from crma.engine import Engine
from crma.methods.base import Method, Task, register


@register
class Crma(Method):
    """A fresh LoRA per domain on the shared CRMA backbone, which keeps training on every domain.

    Earlier domains' LoRAs are frozen; the backbone is never reset (the original's MODULAR).
    """

    name = "crma"
    uses_crma = True

    def trains_backbone(self, task: Task) -> bool:
        return True

    def trainable_groups(self, engine: Engine, task: Task) -> list[dict[str, Any]]:
        groups = super().trainable_groups(engine, task)
        if engine.backbone is not None and self.trains_backbone(task):
            groups += engine.backbone.param_groups()
        return groups


@register
class CrmaTask1(Crma):
    """Capacity control: the backbone trains on the first domain only, then stays frozen."""

    name = "crma-task1"

    def trains_backbone(self, task: Task) -> bool:
        return task.index == 0
