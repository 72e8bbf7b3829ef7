"""Continual training on a stack: open (or create) it, add domains one by one, save each.

Shared by `crma train` (the user's stack) and `crma run` (one stack per method and seed).
Adding a domain holds the stack's writer lock (crma.lock) from training to commit; opening
never locks, and retries when a commit deletes a file it was loading (crma.stack).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from crma.backbone import CRMAConfig, attach_crma, check_fits
from crma.checkpoint import checkpoint_state
from crma.engine import Engine, LoraSettings, check_targets
from crma.errors import UserError, first_line
from crma.lock import WriterLock, check_free
from crma.methods import METHODS, Method, Task, make_method
from crma.settings import from_dict
from crma.stack import (
    ADAPTERS,
    BACKBONE_CONFIG,
    BACKBONE_FILE,
    DAMAGED,
    METHOD_STATE,
    Commit,
    Stack,
)
from crma.train import TrainConfig, Trainer, result_settings

log = logging.getLogger(__name__)
_OPEN_ATTEMPTS = 3  # a commit deleting files mid-load sends a reader back to the manifest


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

    def check_model(self, model) -> None:
        """Refuse settings the base model cannot take (a module it lacks, too many streams)."""
        check_targets(model, self.lora.target_modules, "lora.target_modules")
        if METHODS[self.method].uses_crma:
            check_fits(model, self.crma)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str) -> StackSpec:
        cfg = manifest["configs"]
        return cls(
            method=manifest["method"],
            method_options=cfg.get("method_options") or {},
            lora=from_dict(LoraSettings, cfg.get("lora"), f"{where}: configs.lora"),
            crma=from_dict(CRMAConfig, cfg.get("crma"), f"{where}: configs.crma"),
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
        """Open the stack at `path`, or a new one from `spec`; loads the base via `load_model`.

        Passing `spec` means the caller will write: a stack another process is writing is
        refused now, before the model loads. Nothing is written until a domain commits.
        """
        path = Path(path)
        if spec is not None:
            check_free(path)
        attempts = _OPEN_ATTEMPTS
        while True:
            stack, own = _stack_and_spec(path, base_id, spec)
            try:
                return cls._load(stack, own, load_model)
            except UserError:
                attempts -= 1
                if not attempts or not stack.changed_on_disk():
                    raise
                log.info("%s: a commit replaced files while loading; loading again", path)

    @classmethod
    def _load(
        cls, stack: Stack, spec: StackSpec, load_model: Callable[[], tuple[Any, Any]]
    ) -> ContinualModel:
        method = make_method(spec.method, spec.method_options, f"{stack.path}: method")
        model, tokenizer = load_model()
        spec.check_model(model)
        backbone = attach_crma(model, spec.crma) if method.uses_crma else None
        engine = Engine(model, tokenizer, spec.lora, backbone)
        cm = cls(stack, engine, method, spec)
        cm._load_contents()
        return cm

    def _load_contents(self) -> None:
        stack, engine, method = self.stack, self.engine, self.method
        weights, config = stack.component("backbone"), stack.component("backbone_config")
        if engine.backbone is not None and weights is not None and config is not None:
            _loading(weights, lambda: engine.backbone.load_files(weights, config))
        folders = {method.adapter_name(d): stack.adapter_dir(d) for d in stack.domains}
        for adapter, folder in folders.items():
            _loading(folder, lambda a=adapter, f=folder: engine.load_adapter(a, f))
        method.trained = list(stack.domains)
        state_file = stack.component("method_state")
        if state_file is not None:
            _loading(state_file, lambda: method.load_state_tensors(load_file(str(state_file))))

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
        route_examples: list[dict[str, list[int]]] = (),
    ) -> dict[str, Any]:
        """Train `domain` on top of the stack and commit it (adapter, backbone, state, manifest).
        `route_examples` are stored in the router beside the training examples, never trained on.
        """
        stack, engine, method = self.stack, self.engine, self.method
        if domain in stack.domains and not replace:
            raise UserError(
                f"{stack.path}: domain {domain!r} already exists; pass --replace to retrain it"
            )
        if not examples:
            raise UserError(f"domain {domain!r}: no training examples")
        with self.writing(accelerator):
            index = stack.domains.index(domain) if domain in stack.domains else len(stack.domains)
            if replace and domain in method.trained:
                method.trained.remove(domain)
                adapter = method.adapter_name(domain)
                if method.per_domain_adapter and adapter in engine.adapters:
                    engine.remove_adapter(adapter)  # retrained from scratch
            task = Task(index=index, domain=domain, seed=seed)
            trainer = Trainer(engine, method, train_config, accelerator, run_info)
            start = time.perf_counter()
            result = trainer.train_task(
                task,
                examples,
                stack.checkpoint_dir,
                metrics_path,
                self.total_steps,
                progress=progress,
                resume_key=self._resume_key(task, train_config, examples),
                generation=stack.generation,
            )
            # wall time of this process's training, end-of-domain work included (a resumed
            # domain counts from the checkpoint)
            result["train_seconds"] = round(time.perf_counter() - start, 1)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._commit(
                    task, result, train_config, data_info or {}, replace, examples, route_examples
                )
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:  # the commit the main process just made
                self.stack = Stack.open(stack.path)
        return result

    def tidy(self, accelerator=None) -> None:
        """Remove what an interrupted writer left behind: files no manifest lists, and the
        checkpoint of a domain it committed (killed between the commit and its clean-up).
        A checkpoint of an uncommitted domain stays, to be resumed."""
        if accelerator is not None:  # every process opened the stack before the main one locks it
            accelerator.wait_for_everyone()
        main = accelerator is None or accelerator.is_main_process
        if main and Stack.exists(self.stack.path):
            with self.writing():
                self.stack.collect_garbage()
                state = checkpoint_state(self.stack.checkpoint_dir)
                if state is None or state.get("generation") != self.stack.generation:
                    self.stack.clear_checkpoint()
        if accelerator is not None:  # and none reads the checkpoint while it may be cleared
            accelerator.wait_for_everyone()

    def writing(self, accelerator=None):
        """The stack's writer lock (on the main process), refusing a stack changed on disk
        since it was opened: this process's view of it would overwrite the other commit."""
        if accelerator is not None and not accelerator.is_main_process:
            return nullcontext()
        return _fresh_writer(self.stack)

    def _resume_key(self, task: Task, cfg: TrainConfig, examples: list[dict]) -> str:
        """What a checkpoint must have been made with to be resumed: task, settings, data."""
        data = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
        key = {
            "task": dataclasses.asdict(task),
            "train": result_settings(cfg),
            "method": self.spec.method,
            "stack": self.spec.to_manifest(),
            "data": data,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _commit(
        self,
        task: Task,
        result: dict[str, Any],
        cfg: TrainConfig,
        data_info,
        replace: bool,
        examples: list[dict[str, list[int]]] = (),
        route_examples: list[dict[str, list[int]]] = (),
    ) -> None:
        from crma.routing.index import update_router

        stack, engine, method = self.stack, self.engine, self.method
        commit = stack.begin_commit()
        adapter = method.adapter_name(task.domain)
        folder = commit.write(
            f"{ADAPTERS}/{method.adapter_folder(task.domain)}",
            lambda tmp: engine.save_adapter(adapter, tmp),
            folder=True,
        )
        if examples:  # the domain's routing entry; earlier domains' entries stay as they are
            update_router(commit, engine, task.domain, examples, route_examples)
        if engine.backbone is not None:
            commit.set_component(
                "backbone", commit.write(BACKBONE_FILE, engine.backbone.save_weights)
            )
            commit.set_component(
                "backbone_config", commit.write_json(BACKBONE_CONFIG, engine.backbone.meta())
            )
        commit.set_component("method_state", _write_state(commit, method.state_tensors()))
        entry = {
            "name": task.domain,
            "adapter": adapter,
            "seed": task.seed,
            **data_info,
            **result,
            "train_config": dataclasses.asdict(cfg),
        }
        commit.record_domain(entry, folder, replace=replace)
        commit.finish()  # the commit point
        stack.clear_checkpoint()


@contextmanager
def _fresh_writer(stack: Stack) -> Iterator[None]:
    """`WriterLock` on the stack, plus: nobody committed since this process read it."""
    with WriterLock(stack.path):
        if stack.changed_on_disk():
            raise UserError(
                f"{stack.path}: another process committed to this stack since this one "
                "opened it; run the command again"
            )
        yield


def _stack_and_spec(
    path: Path, base_id: dict[str, str], spec: StackSpec | None
) -> tuple[Stack, StackSpec]:
    if Stack.exists(path):
        stack = Stack.open(path)
        stack.check_base(base_id)
        own = StackSpec.from_manifest(stack.manifest, str(path))
        if spec is not None and spec.method != own.method:
            raise UserError(f"{path}: stack uses method {own.method!r}, not {spec.method!r}")
        return stack, own
    if spec is None:
        raise UserError(f"{path}: not a crma stack (no manifest.json)")
    return Stack.new(path, base_id, spec.method, spec.to_manifest()), spec


def _loading(file: Path, load: Callable[[], None]) -> None:
    """Run `load`; any failure is a one-line error naming the stack file it read."""
    try:
        load()
    except UserError:
        raise
    except Exception as exc:  # damaged files raise many kinds (safetensors, JSON, shapes)
        raise UserError(f"{file}: cannot load ({first_line(exc)}); {DAMAGED}") from exc


def _write_state(commit: Commit, state: dict[str, Any]) -> str | None:
    if not state:
        return None
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return commit.write(METHOD_STATE, lambda tmp: save_file(tensors, str(tmp)))
