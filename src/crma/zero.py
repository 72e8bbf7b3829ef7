"""DeepSpeed ZeRO-2 (`train.deepspeed: 2`): AdamW's state and the gradients of the trainable
weights sharded over the processes, under torchrun (gloo on CPUs) or an accelerate launch with
configs/accelerate/deepspeed-zero2.yaml (GPUs).

crma's loop keeps its semantics: the same loss scaling and micro-batches (DeepSpeed's
accumulation count is `train.grad_accum`, its loss scaling by it turned off), the same AdamW
with CRMA's learning rate per group, ZClip's clipping (DeepSpeed clips the total norm at this
step's ZClip threshold, as `clip_grads_with_norm_` does, and reports the norm back to ZClip),
and checkpoints in the one-process format (the sharded AdamW state gathered per parameter). A
non-finite gradient norm makes DeepSpeed skip the step; the trainer then stops the domain. The
base stays replicated and frozen: ZeRO-2 shards what is trained, which for LoRA and CRMA is
small.

ZeRO-3 is refused: it partitions every weight, the base's too, and crma's evaluation and commits
run forward passes on the main process alone, which would wait for the other processes' shards
(FSDP, crma.fsdp, gathers the base around them; nothing does that for ZeRO-3 yet).
"""

from __future__ import annotations

from typing import Any

import torch

from crma.errors import UserError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def zero_stage(setting: int, accelerator) -> int:
    """The ZeRO stage training uses: train.deepspeed, or the stage of an accelerate launch with
    a DeepSpeed config (GPUs)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return int(accelerator.state.deepspeed_plugin.zero_stage)
    return setting


def refuse_zero(stage: int, method, world: int) -> None:
    """One-line refusals for what ZeRO cannot train the same way."""
    if stage == 0:
        return
    if stage != 2:
        raise UserError(
            f"train.deepspeed: ZeRO-{stage} is not supported (it partitions every weight, and "
            "evaluation and commits run on the main process alone); use 2, or train.fsdp to "
            "shard the base"
        )
    if world < 2:
        raise UserError(
            "train.deepspeed: shards over several processes; launch with torchrun --standalone "
            "--nproc_per_node N -m crma ... (or set train.deepspeed: 0)"
        )
    if not method.zero:
        raise UserError(
            f"train.deepspeed: method {method.name!r} edits its trained weights in place after "
            "each step, which ZeRO-2's sharded copy of them would undo; train it data-parallel "
            "(train.deepspeed: 0)"
        )


class ZeroOptimizer:
    """One domain's DeepSpeed engine around crma's model and AdamW, with the optimizer's
    interface the trainer uses (param_groups, state_dict, load_state_dict)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.AdamW, grad_accum: int):
        try:
            import deepspeed
        except ImportError as exc:
            raise UserError(
                "train.deepspeed: needs the deepspeed package (pip install 'crma[distributed]')"
            ) from exc
        # Its shared-memory all-reduce serves inference only and is compiled (C++) on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.inner = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.counts = [len(group["params"]) for group in optimizer.param_groups]
        config = {
            "train_micro_batch_size_per_gpu": 1,  # crma batches itself
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": 0.0,  # set per step from ZClip
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, no compiled optimizer
        }
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch, `loss` already scaled by the trainer."""
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:  # counts the micro-batch; DeepSpeed steps at the last one only
            self.engine.step()

    def step(self, zclip) -> dict[str, Any]:
        """The optimizer step, clipped at ZClip's threshold; ZClip's statistics."""
        limit = zclip.threshold() if zclip is not None else None
        self.zero.clip_grad = limit or 0.0
        self.engine.step()
        norm = float(self.engine.get_global_grad_norm())
        if zclip is not None:
            return zclip.record(norm, limit)
        return {"grad_norm": norm, "grad_norm_clipped": norm}

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state as one process holds it, per parameter (a collective: every process
        calls it)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        groups, start = [], 0
        for group, count in zip(self.inner.param_groups, self.counts, strict=True):
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + count))})
            start += count
        state = {}
        if self.inner.state:  # from the first step on
            self._link_states()
            step = next(iter(self.inner.state.values()))["step"]
            for index, param in enumerate(self.params):
                full = {k: safe_get_full_optimizer_state(param, k) for k in ADAM_STATES}
                state[index] = {"step": step.clone(), **full}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a one-process AdamW state; the sharded fp32 weights follow the parameters,
        which the trainer has just restored."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for param in self.params:
            safe_set_full_fp32_param(param, param.detach().float())
        state = state_dict["state"]
        if not state:
            return
        step = next(iter(state.values()))["step"]
        for group in self.inner.param_groups:  # AdamW's state, made before its first step
            for flat in group["params"]:
                zeros = {k: torch.zeros_like(flat) for k in ADAM_STATES}
                self.inner.state[flat] = {"step": step.clone(), **zeros}
        self._link_states()
        for index, param in enumerate(self.params):
            for key in ADAM_STATES:
                value = state.get(index, {}).get(key, torch.zeros_like(param))
                safe_set_full_optimizer_state(param, value.to(param.device), key)

    def _link_states(self) -> None:
        """Point each parameter at its shard of AdamW's state. (DeepSpeed links them once,
        after the first group's first step, when the other groups have no state yet.)"""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        shards = self.zero.single_partition_of_fp32_groups
        for params, shard in zip(self.zero.bit16_groups, shards, strict=True):
            lazy_init_hp_params_optimizer_state(params, shard, self.inner.state)

    def close(self) -> None:
        """Remove DeepSpeed's gradient hooks: the next domain makes its own engine."""
        self.engine.destroy()
