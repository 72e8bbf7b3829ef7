"""The trainer: one domain at a time, on accelerate, with ZClip, metrics and resumable checkpoints.

Checkpoints hold everything that decides the next step (trainable weights, AdamW state, ZClip
statistics, the torch RNG, the method's state, the metrics file offset) and data order comes
from the seed, so a run killed at any moment and rerun ends with the same numbers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crma.batching import batch_order, collate, shard, steps_for
from crma.engine import Engine
from crma.fileio import atomic_path, write_json
from crma.methods.base import Example, Method, Task, params_of
from crma.settings import setting
from crma.zclip import ZClip


@dataclass
class TrainConfig:
    """Training of each domain."""

    lr: float = setting(1e-3, "LoRA learning rate (CRMA groups use crma.lr_*)")
    batch_size: int = setting(8, "examples per optimizer step (global, across processes)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    epochs: float = setting(1.0, "passes over each domain's training data")
    max_steps: int | None = setting(None, "optimizer steps per domain; overrides epochs")
    max_length: int = setting(256, "tokens per example (longer ones are truncated)")
    warmup_ratio: float = setting(0.1, "fraction of a domain's steps with linear warm-up")
    min_lr_ratio: float = setting(0.1, "cosine decays to this fraction of the peak lr")
    weight_decay: float = setting(0.0, "AdamW weight decay on LoRA/projection weights")
    zclip: bool = setting(True, "ZClip adaptive gradient clipping (EMA 0.97, z 2.5, max norm 1)")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "auto: bf16 autocast on GPUs that support it, fp32 otherwise"
    )
    log_every: int = setting(1, "write metrics.jsonl every N steps")
    checkpoint_every: int = setting(25, "checkpoint every N steps (and at domain ends)")
    tensorboard: bool = setting(False, "also log to TensorBoard (needs `pip install tensorboard`)")


def mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if precision == "bf16" else "no"


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to `min_ratio` (step counts from 0)."""
    warmup = max(1, round(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self,
        engine: Engine,
        method: Method,
        config: TrainConfig,
        accelerator,
        run_info: dict[str, Any],
    ):
        self.engine, self.method, self.config, self.accelerator = (
            engine,
            method,
            config,
            accelerator,
        )
        self.run_info = run_info  # method label and seed, copied into every metrics line

    def train_task(
        self,
        task: Task,
        examples: list[Example],
        checkpoint_dir: Path,
        metrics_path: Path,
        global_step_offset: int = 0,
        progress: str = "",
    ) -> dict[str, Any]:
        """Train `task` to the end (resuming from `checkpoint_dir` if it holds this task)."""
        cfg, acc, engine = self.config, self.accelerator, self.engine
        self.method.begin_task(engine, task, examples)
        groups = self.method.trainable_groups(engine, task)
        for group in groups:
            group.setdefault("lr", cfg.lr)
            group.setdefault("weight_decay", cfg.weight_decay)
            group["base_lr"] = group["lr"]
        params = params_of(groups)
        engine.set_trainable(params)
        optimizer = torch.optim.AdamW(groups)
        zclip = ZClip(max_norm=1.0) if cfg.zclip else None
        steps = steps_for(len(examples), cfg.batch_size, cfg.epochs, cfg.max_steps)
        order = batch_order(len(examples), cfg.batch_size, steps, task.rng_seed("data"))
        torch.manual_seed(task.rng_seed("dropout"))

        named = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}
        start = self._resume(checkpoint_dir, task, named, optimizer, zclip, metrics_path)
        if start == 0:  # marks where this task's metrics begin, for a resume before step 1
            self._save_checkpoint(checkpoint_dir, task, 0, named, optimizer, zclip, metrics_path)
        model = acc.prepare_model(engine.model) if acc.num_processes > 1 else engine.model
        model.train()
        writer = (
            self._tensorboard(metrics_path.parent)
            if cfg.tensorboard and acc.is_main_process
            else None
        )
        bar = tqdm(
            total=steps,
            initial=start,
            desc=progress or task.domain,
            disable=not acc.is_main_process or not sys.stderr.isatty(),
            dynamic_ncols=True,
            leave=False,
        )
        last_loss, tokens, t0 = float("nan"), 0, time.perf_counter()
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(
                    step, steps, cfg.warmup_ratio, cfg.min_lr_ratio
                )
            chosen = self.method.batch_examples(task, step, [examples[j] for j in order[step]])
            loss_value, n_tokens = self._step(model, chosen, params)
            stats = zclip.step(params) if zclip else _plain_norm(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss, tokens = loss_value, tokens + n_tokens
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                line = self._metrics_line(
                    task, step, global_step_offset, loss_value, stats, optimizer, tokens, t0
                )
                self._append_metrics(metrics_path, line, writer)
            bar.set_postfix(
                loss=f"{loss_value:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}"
            )
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                self._save_checkpoint(
                    checkpoint_dir, task, step + 1, named, optimizer, zclip, metrics_path
                )
        bar.close()
        if writer is not None:
            writer.close()
        self.method.end_task(engine, task, examples)
        return {"steps": steps, "final_train_loss": last_loss, "examples": len(examples)}

    # -- one optimizer step -----------------------------------------------------------------
    def _step(self, model, chosen: list[Example], params) -> tuple[float, int]:
        acc, cfg = self.accelerator, self.config
        mine = shard(chosen, acc.process_index, acc.num_processes)
        micro = [mine[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
        total_loss, total_tokens = 0.0, 0
        for i, part in enumerate(micro):
            batch = collate(part, self.engine.tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            ctx = acc.no_sync(model) if (not sync and acc.num_processes > 1) else nullcontext()
            with ctx, acc.autocast():
                outputs = model(**batch)
                loss = outputs.loss
                extra = self.method.extra_loss(self.engine, batch, outputs)
                if extra is not None:
                    loss = loss + extra
            acc.backward(loss / len(micro))
            total_loss += loss.item() / len(micro)
            total_tokens += int(batch["attention_mask"].sum())
        return total_loss, total_tokens

    # -- logging ------------------------------------------------------------------------
    def _metrics_line(
        self, task, step, offset, loss, stats, optimizer, tokens, t0
    ) -> dict[str, Any]:
        line = {
            **self.run_info,
            "domain": task.domain,
            "step": step + 1,
            "global_step": offset + step + 1,
            "loss": loss,
            "grad_norm": stats["grad_norm"],
            "grad_norm_clipped": stats["grad_norm_clipped"],
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens / max(1e-9, time.perf_counter() - t0),
        }
        backbone = self.engine.backbone
        if backbone is not None and backbone.enabled:
            line.update(backbone.spectral_stats())
        return line

    def _append_metrics(self, path: Path, line: dict[str, Any], writer) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        if writer is not None:
            for key, value in line.items():
                if isinstance(value, int | float):
                    writer.add_scalar(f"{line['domain']}/{key}", value, line["global_step"])

    @staticmethod
    def _tensorboard(directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            from crma.errors import UserError

            raise UserError(
                "train.tensorboard: needs the tensorboard package (pip install tensorboard)"
            ) from exc
        return SummaryWriter(str(directory / "tensorboard"))

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(
        self, directory: Path, task: Task, step: int, named, optimizer, zclip, metrics_path: Path
    ):
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        opt_state = optimizer.state_dict()
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
        for idx, state in opt_state["state"].items():
            for key, value in state.items():
                tensors[f"opt/{idx}/{key}"] = value.detach().cpu().contiguous()
        tensors["rng/cpu"] = torch.get_rng_state()
        tensors.update(
            {
                f"method/{k}": v.detach().cpu().contiguous()
                for k, v in self.method.state_tensors().items()
            }
        )
        state = {
            "domain": task.domain,
            "index": task.index,
            "seed": task.seed,
            "step": step,
            "optimizer_groups": opt_state["param_groups"],
            "zclip": zclip.state_dict() if zclip else None,
            "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0,
        }
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "state.safetensors"))
            write_json(tmp / "state.json", state)

    def _resume(
        self, directory: Path, task: Task, named, optimizer, zclip, metrics_path: Path
    ) -> int:
        """Restore a checkpoint of this very task; return the step to continue from (0: fresh)."""
        state_file = directory / "state.json"
        if not state_file.is_file():
            return 0
        state = json.loads(state_file.read_text())
        if (state["domain"], state["index"], state["seed"]) != (task.domain, task.index, task.seed):
            return 0
        tensors = load_file(str(directory / "state.safetensors"))
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(tensors[f"param/{name}"])
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer_groups"]}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, idx, name = key.split("/", 2)
                opt_state["state"].setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict(opt_state)
        if zclip is not None and state["zclip"] is not None:
            zclip.load_state_dict(state["zclip"])
        torch.set_rng_state(tensors["rng/cpu"])
        method_state = {
            k[len("method/") :]: v for k, v in tensors.items() if k.startswith("method/")
        }
        if method_state:
            self.method.load_state_tensors(method_state)
        if metrics_path.exists() and self.accelerator.is_main_process:
            with open(metrics_path, "r+b") as fh:
                fh.truncate(state["metrics_bytes"])
        return state["step"]


def _plain_norm(params) -> dict[str, float]:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    return {"grad_norm": norm, "grad_norm_clipped": norm}


def config_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)
