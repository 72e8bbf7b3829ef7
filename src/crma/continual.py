"""Continual training on a stack: open (or create) it, add domains one by one, save each.

Shared by `crma train` (the user's stack) and `crma run` (one stack per method and seed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from crma.adapter import CRMAConfig, attach_crma, read_backbone_meta
from crma.engine import Engine, LoraSettings
from crma.errors import UserError
from crma.fileio import atomic_path
from crma.methods import Method, Task, make_method
from crma.settings import from_dict
from crma.stack import Stack
from crma.train import TrainConfig, Trainer

log = logging.getLogger(__name__)
METHOD_STATE = "method_state.safetensors"


@dataclass
class StackSpec:
    """What a stack is made of; fixed when the stack is created."""

    method: str
    method_options: dict[str, Any]
    lora: LoraSettings
    crma: CRMAConfig

    def to_manifest(self) -> dict[str, Any]:
        return {
            "method_options": self.method_options,
            "lora": dataclasses.asdict(self.lora),
            "crma": dataclasses.asdict(self.crma),
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str) -> StackSpec:
        cfg = manifest["configs"]
        return cls(
            method=manifest["method"],
            method_options=cfg.get("method_options") or {},
            lora=from_dict(LoraSettings, cfg["lora"], f"{where}: configs.lora"),
            crma=from_dict(CRMAConfig, cfg["crma"], f"{where}: configs.crma"),
        )


class ContinualModel:
    """A stack opened in memory: engine + method, ready to add domains or evaluate."""

    def __init__(self, stack: Stack, engine: Engine, method: Method, spec: StackSpec):
        self.stack, self.engine, self.method, self.spec = stack, engine, method, spec

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        load_model: Callable[[], tuple[Any, Any]],
        base_id: dict[str, str],
        spec: StackSpec | None = None,
    ) -> ContinualModel:
        """Open the stack at `path`, or create it from `spec`; loads the base via `load_model`."""
        if Stack.exists(path):
            stack = Stack.open(path)
            stack.check_base(base_id)
            own = StackSpec.from_manifest(stack.manifest, str(path))
            if spec is not None and spec.method != own.method:
                raise UserError(f"{path}: stack uses method {own.method!r}, not {spec.method!r}")
            spec = own
        else:
            if spec is None:
                raise UserError(f"{path}: not a crma stack (no manifest.json)")
            stack = Stack.create(path, base_id, spec.method, spec.to_manifest())
        method = make_method(spec.method, spec.method_options, f"{path}: method")
        model, tokenizer = load_model()
        backbone = attach_crma(model, spec.crma) if method.uses_crma else None
        engine = Engine(model, tokenizer, spec.lora, backbone)
        cm = cls(stack, engine, method, spec)
        cm._load_contents()
        return cm

    def _load_contents(self) -> None:
        stack, engine, method = self.stack, self.engine, self.method
        if engine.backbone is not None and (stack.path / "crma_backbone.safetensors").is_file():
            read_backbone_meta(stack.path)
            engine.backbone.load(stack.path)
        for adapter in dict.fromkeys(method.adapter_name(d) for d in stack.domains):
            engine.load_lora(adapter, stack.adapter_dir(adapter))
        method.trained = list(stack.domains)
        state_file = stack.path / METHOD_STATE
        if state_file.is_file():
            method.load_state_tensors(load_file(str(state_file)))

    @property
    def total_steps(self) -> int:
        return sum(d.get("steps", 0) for d in self.stack.manifest["domains"])

    def add_domain(
        self,
        domain: str,
        examples: list[dict[str, list[int]]],
        train_config: TrainConfig,
        accelerator,
        seed: int,
        metrics_path: Path,
        run_info: dict[str, Any],
        data_info: dict[str, Any] | None = None,
        replace: bool = False,
        progress: str = "",
    ) -> dict[str, Any]:
        """Train `domain` on top of the stack and commit it (adapter, backbone, state, manifest)."""
        stack, engine, method = self.stack, self.engine, self.method
        if domain in stack.domains and not replace:
            raise UserError(
                f"{stack.path}: domain {domain!r} already exists; pass --replace to retrain it"
            )
        if not examples:
            raise UserError(f"domain {domain!r}: no training examples")
        index = stack.domains.index(domain) if domain in stack.domains else len(stack.domains)
        if replace and domain in method.trained:
            method.trained.remove(domain)
            adapter = method.adapter_name(domain)
            if method.per_domain_adapter and adapter in engine.adapters:
                engine.remove_adapter(adapter)  # retrained from scratch
        task = Task(index=index, domain=domain, seed=seed)
        trainer = Trainer(engine, method, train_config, accelerator, run_info)
        result = trainer.train_task(
            task, examples, stack.checkpoint_dir, metrics_path, self.total_steps, progress=progress
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._commit(task, result, train_config, data_info or {}, replace, examples)
        accelerator.wait_for_everyone()
        return result

    def _commit(
        self,
        task: Task,
        result: dict[str, Any],
        cfg: TrainConfig,
        data_info,
        replace: bool,
        examples: list[dict[str, list[int]]] = (),
    ) -> None:
        from crma.route import update_router

        stack, engine, method = self.stack, self.engine, self.method
        adapter = method.adapter_name(task.domain)
        stack.write_adapter(adapter, lambda d: engine.save_lora(adapter, d))
        if examples:  # the domain's routing prototype; earlier domains' entries stay as they are
            update_router(stack, engine, task.domain, examples)
        if engine.backbone is not None:
            engine.backbone.save(stack.path)
        state = method.state_tensors()
        if state:
            with atomic_path(stack.path / METHOD_STATE) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        entry = {
            "name": task.domain,
            "adapter": adapter,
            "seed": task.seed,
            **data_info,
            **result,
            "train_config": dataclasses.asdict(cfg),
        }
        stack.record_domain(entry, replace=replace)
        stack.commit()  # the commit point
        stack.clear_checkpoint()
