"""The trainer: one domain at a time, on accelerate, with ZClip, metrics and resumable checkpoints.

Checkpoints hold everything that decides the next step (trainable weights, AdamW state, ZClip
statistics, the torch RNG, the method's state, the metrics file offset) and data order comes
from the seed, so a run killed at any moment and rerun ends with the same numbers. A checkpoint
is one file, replaced atomically, and is resumed only by the same task with the same settings
and data from the same committed stack. A non-finite loss, gradient or weight stops the domain
before anything is written.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crma.batching import batch_order, collate, first_drawn, shard, steps_for
from crma.checkpoint import Checkpoint, file_size
from crma.distributed import gather_rows, label_tokens, refuse_unsupported, uses_fsdp
from crma.engine import Engine
from crma.errors import UserError
from crma.fileio import atomic_path
from crma.fsdp import average_gradients, gather_base, shard_base
from crma.methods.base import Example, Method, Task, params_of
from crma.quantize import loaded_as
from crma.settings import SettingError, Settings, setting
from crma.zclip import ZClip, unclipped
from crma.zero import ZeroOptimizer, zero_stage


@dataclass
class TrainConfig(Settings):
    """Training of each domain."""

    lr: float = setting(
        9e-3,
        "LoRA learning rate (CRMA groups use crma.lr_*); the default is crma's rate in the "
        "published long-protocol runs (results/long), chosen on validation "
        "(results/tuning/long-crma.md); every protocol's choices are in configs/",
        gt=0,
    )
    batch_size: int = setting(8, "examples per optimizer step (global, across processes)", ge=1)
    grad_accum: int = setting(
        1, "micro-batches per optimizer step (same result as one batch, less memory)", ge=1
    )
    gradient_checkpointing: bool = setting(
        False, "recompute each layer's activations in backward (same result, less memory)"
    )
    fsdp: bool = setting(
        False,
        "shard the frozen base over the processes with FSDP2 while steps run (torchrun); "
        "adapters and backbone stay replicated (same result, less memory)",
    )
    deepspeed: int = setting(
        0,
        "DeepSpeed ZeRO stage: 2 shards AdamW's state and the gradients over the processes, "
        "3 also the frozen base while steps run (torchrun; needs crma[distributed]); 0: off "
        "(same result, less memory)",
        check=lambda v: None if v in (0, 2, 3) else "0 (off), 2 or 3",
    )
    epochs: float = setting(1.0, "passes over each domain's training data", gt=0)
    max_steps: int | None = setting(None, "optimizer steps per domain; overrides epochs", ge=1)
    max_length: int = setting(256, "tokens per example (longer ones are truncated)", ge=2)
    warmup_ratio: float = setting(
        0.1, "fraction of a domain's steps with linear warm-up", ge=0, lt=1
    )
    min_lr_ratio: float = setting(0.1, "cosine decays to this fraction of the peak lr", ge=0, le=1)
    weight_decay: float = setting(0.0, "AdamW weight decay on LoRA/projection weights", ge=0)
    zclip: bool = setting(
        True,
        "ZClip gradient clipping (EMA 0.97, z 2.5, max norm 1); its 25-step warm-up restarts "
        "every domain, so a domain of at most 25 steps is clipped at max norm 1 only",
    )
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "auto: bf16 autocast on GPUs that support it, fp32 otherwise"
    )
    log_every: int = setting(1, "write metrics.jsonl every N steps", ge=1)
    checkpoint_every: int = setting(25, "checkpoint every N steps (and at domain ends)", ge=1)
    tensorboard: bool = setting(False, "also log to TensorBoard (needs `pip install tensorboard`)")

    def check_together(self) -> None:
        if self.grad_accum > self.batch_size:  # a micro-batch needs at least one example
            raise SettingError(
                "grad_accum", self.grad_accum, f"at most batch_size ({self.batch_size})"
            )
        if self.deepspeed and self.fsdp:
            raise SettingError("deepspeed", self.deepspeed, "0 when train.fsdp is true")


# Settings that change memory use, not results: what a checkpoint or a finished domain is
# matched on leaves them out, so a run that ran out of memory resumes with them turned on.
MEMORY_ONLY = ("gradient_checkpointing", "fsdp", "deepspeed")


def result_settings(config: TrainConfig) -> dict[str, Any]:
    """The training settings that decide the numbers (all but MEMORY_ONLY)."""
    return {k: v for k, v in asdict(config).items() if k not in MEMORY_ONLY}


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
        # method label, seed and how the base is loaded, copied into every metrics line
        self.run_info = {**run_info, "load_in": loaded_as(engine.base)}
        self.fsdp = uses_fsdp(config.fsdp, accelerator)
        self.zero_stage = zero_stage(config.deepspeed, accelerator)
        # plain data parallel: accelerate's DDP wrapper reduces the gradients (FSDP and
        # DeepSpeed reduce them their own way)
        self.ddp = accelerator.num_processes > 1 and not self.fsdp and not self.zero_stage

    def train_task(
        self,
        task: Task,
        examples: list[Example],
        checkpoint_dir: Path,
        metrics_path: Path,
        global_step_offset: int = 0,
        progress: str = "",
        resume_key: str = "",
        generation: int = 0,
    ) -> dict[str, Any]:
        """Train `task` to the end, resuming from `checkpoint_dir` if it holds this task with
        this `resume_key`, made on stack `generation`."""
        cfg, acc, engine = self.config, self.accelerator, self.engine
        refuse_unsupported(self.method, acc, self.fsdp, self.zero_stage, cfg.gradient_checkpointing)
        if cfg.batch_size < acc.num_processes * cfg.grad_accum:
            raise UserError(
                f"train.batch_size: {cfg.batch_size} examples cannot fill {cfg.grad_accum} "
                f"micro-batches on each of {acc.num_processes} processes; use at least "
                f"{acc.num_processes * cfg.grad_accum}"
            )
        steps = steps_for(len(examples), cfg.batch_size, cfg.epochs, cfg.max_steps)
        order = batch_order(len(examples), cfg.batch_size, steps, task.rng_seed("data"))
        task = replace(task, train_indices=first_drawn(order))
        self.method.begin_task(engine, task, examples)
        groups = self.method.trainable_groups(engine, task)
        for group in groups:
            group.setdefault("lr", cfg.lr)
            group.setdefault("weight_decay", cfg.weight_decay)
            group["base_lr"] = group["lr"]
        params = params_of(groups)
        engine.set_trainable(params)
        shards = shard_base(engine, acc) if self.fsdp else None
        optimizer = torch.optim.AdamW(groups)
        zero = None
        if self.zero_stage:
            whole = engine.added_parameters()
            zero = ZeroOptimizer(engine.model, optimizer, cfg.grad_accum, self.zero_stage, whole)
            if zero.base_share is not None:  # ZeRO-3
                shards = [row[0] for row in gather_rows(acc, [zero.base_share])]
        optimizer = zero or optimizer
        zclip = ZClip(max_norm=1.0) if cfg.zclip else None
        torch.manual_seed(task.rng_seed("dropout"))

        named = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}
        ckpt = Checkpoint(checkpoint_dir, metrics_path, resume_key, generation)
        start = self._resume(ckpt, named, optimizer, zclip)
        if start == 0:  # marks where this task's metrics begin, for a resume before step 1
            self._save_checkpoint(ckpt, task, 0, named, optimizer, zclip)
        model = engine.model
        if zero:  # DeepSpeed's engine reduces the gradients
            model = zero.engine
        elif self.ddp:
            model = acc.prepare_model(engine.model)
        model.train()
        if cfg.gradient_checkpointing:  # recomputes each layer's forward; CRMA's hooks run once
            engine.base.activation_checkpointing_enable({"use_reentrant": False})
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
        tokens, t0 = 0, time.perf_counter()
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(
                    step, steps, cfg.warmup_ratio, cfg.min_lr_ratio
                )
            chosen = self.method.batch_examples(task, step, [examples[j] for j in order[step]])
            loss_value, n_tokens, shares = self._step(model, chosen, params, zero)
            ckpt.add_shares(shares)
            if zero:  # DeepSpeed clips and steps (and skips a non-finite step)
                stats = zero.step(zclip)
            elif zclip:
                stats = zclip.step(params)
            else:
                stats = unclipped(params)
            finite = {"loss": loss_value, "gradient": stats["grad_norm"]}
            ckpt.stop_unless_finite(
                task.domain, step, {k: math.isfinite(v) for k, v in finite.items()}
            )
            if not zero:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            weights = torch.stack([p.detach().isfinite().all() for p in params]).all().item()
            ckpt.stop_unless_finite(task.domain, step, {"weight": weights})
            ckpt.last_loss, tokens = loss_value, tokens + n_tokens
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                line = self._metrics_line(
                    task, step, global_step_offset, loss_value, stats, optimizer, tokens, t0
                )
                line |= {
                    "world_size": acc.num_processes,
                    "fsdp": self.fsdp,
                    "deepspeed": self.zero_stage,
                    "rank_examples": [s[0] for s in shares],
                }
                self._append_metrics(metrics_path, line, writer)
            bar.set_postfix(
                loss=f"{loss_value:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}"
            )
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                self._save_checkpoint(ckpt, task, step + 1, named, optimizer, zclip)
        bar.close()
        if self.ddp:  # this domain's DDP wrapper goes, and its gradient hooks
            acc.free_memory(model)
        if zero:  # under ZeRO-3 the base is gathered again: evaluation and the commit run
            zero.close()  # forward passes on one process alone
        if cfg.gradient_checkpointing:
            engine.base.activation_checkpointing_disable()
        if writer is not None:
            writer.close()
        self.method.end_task(engine, task, examples)
        if self.fsdp:  # evaluation and the commit run forward passes on one process alone
            gather_base(engine)
        return {
            "steps": steps,
            "final_train_loss": ckpt.last_loss,
            "examples": len(examples),
            "load_in": self.run_info["load_in"],
            "world_size": acc.num_processes,
            "base_shares": shards,  # the part of the base each process held (FSDP, ZeRO-3)
            "rank_examples": [s[0] for s in ckpt.shares],  # what each process trained on
            "rank_tokens": [s[1] for s in ckpt.shares],
        }

    # -- one optimizer step -----------------------------------------------------------------
    def _step(
        self, model, chosen: list[Example], params, zero: ZeroOptimizer | None
    ) -> tuple[float, int, list[list[int]]]:
        """Forward and backward of one optimizer step on this process's shard of `chosen`.

        Every micro-batch on every process divides its summed token loss by the token count of
        the whole global batch, so the gradients add up (DDP, DeepSpeed, or `average_gradients`
        under FSDP, averages them, hence × world) to those of one process on the whole batch:
        results do not depend on the number of processes or micro-batches. Returns the step's
        loss and tokens (over all processes) and each process's (examples, tokens).
        """
        acc, cfg = self.accelerator, self.config
        world = acc.num_processes
        n_items = max(1, label_tokens(chosen))
        mine = shard(chosen, acc.process_index, world)
        micro = [mine[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
        my_loss, my_tokens = 0.0, 0
        for i, part in enumerate(micro):
            batch = collate(part, self.engine.tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            ctx = acc.no_sync(model) if not sync and self.ddp else nullcontext()
            with ctx, acc.autocast():
                outputs = model(**batch, num_items_in_batch=n_items, use_cache=False)
                loss = outputs.loss * world
                extra = self.method.extra_loss(self.engine, batch, outputs)
                if extra is not None:  # a per-step term: counted once per step
                    loss = loss + extra / len(micro)
            if zero:
                zero.backward(loss, last=sync)
            else:
                acc.backward(loss)
            my_loss += loss.item() / world
            my_tokens += int(batch["attention_mask"].sum())
        if self.fsdp:  # FSDP leaves the replicated weights' gradients to us
            average_gradients(params, world)
        rows = gather_rows(acc, [my_loss, len(mine), my_tokens])
        shares = [[int(r[1]), int(r[2])] for r in rows]
        return sum(r[0] for r in rows), sum(s[1] for s in shares), shares

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
            raise UserError(
                "train.tensorboard: needs the tensorboard package (pip install tensorboard)"
            ) from exc
        return SummaryWriter(str(directory / "tensorboard"))

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(
        self, ckpt: Checkpoint, task: Task, step: int, named, optimizer, zclip
    ) -> None:
        self.accelerator.wait_for_everyone()
        opt_state = optimizer.state_dict()  # DeepSpeed gathers it from every process
        if not self.accelerator.is_main_process:
            return
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
            "step": step,
            "resume_key": ckpt.resume_key,
            "generation": ckpt.generation,
            "optimizer_groups": opt_state["param_groups"],
            "zclip": zclip.state_dict() if zclip else None,
            "metrics_bytes": file_size(ckpt.metrics),
            "metrics_start": ckpt.metrics_start,
            "last_loss": ckpt.last_loss,
            "shares": ckpt.shares,
            "world_size": self.accelerator.num_processes,
        }
        ckpt.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt.file) as tmp:
            save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})

    def _resume(self, ckpt: Checkpoint, named, optimizer, zclip) -> int:
        """Restore the checkpoint if it is this task's; return the step to continue from.

        A checkpoint made on this stack generation did not commit (killed, or stopped by an
        error). With the same settings and data it is resumed, the metrics cut back to its
        step; otherwise training starts afresh and the metrics are cut back to where that
        attempt began. Any other checkpoint belongs to a commit already made, or to another
        stack state, and is ignored.
        """
        state = ckpt.state()
        if state is not None and state.get("generation") == ckpt.generation:
            # Another number of processes restarts the domain (the shares would not add up).
            world = state.get("world_size", 1) == self.accelerator.num_processes
            resume = state.get("resume_key") == ckpt.resume_key and world
            self._cut_metrics(ckpt.metrics, state["metrics_bytes" if resume else "metrics_start"])
            if resume:
                ckpt.metrics_start, ckpt.last_loss = state["metrics_start"], state["last_loss"]
                ckpt.shares = state.get("shares", [])
                return self._restore(ckpt, state, named, optimizer, zclip)
        ckpt.metrics_start = file_size(ckpt.metrics)
        return 0

    def _cut_metrics(self, path: Path, size: int) -> None:
        if path.exists() and self.accelerator.is_main_process:
            with open(path, "r+b") as fh:
                fh.truncate(size)

    def _restore(self, ckpt: Checkpoint, state: dict[str, Any], named, optimizer, zclip) -> int:
        tensors = load_file(str(ckpt.file))
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
        return state["step"]
