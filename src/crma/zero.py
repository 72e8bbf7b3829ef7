"""DeepSpeed ZeRO (`train.deepspeed: 2` or `3`) under torchrun (gloo on CPUs), or an
accelerate launch with configs/accelerate/deepspeed-zero{2,3}.yaml (GPUs).

ZeRO-2 shards AdamW's state and the gradients of the trained weights over the processes. ZeRO-3
also partitions the frozen base while a domain's steps run: each process holds 1/N of every
base weight larger than the largest adapter or backbone tensor, and DeepSpeed gathers a module's
weights around its forward and backward. The adapters and the CRMA backbone stay whole on every
process (DeepSpeed's persistent parameters), so CRMA's hooks, which read the backbone inside the
decoder layers' forwards, see ordinary tensors, as under FSDP (crma.fsdp). At the end of a
domain the base is gathered into plain weights and the engine removed, so evaluation and
commits, which run on the main process alone, need no collective.

crma's loop keeps its semantics: the same loss scaling and micro-batches (DeepSpeed's
accumulation count is `train.grad_accum`, its loss scaling by it turned off), the same AdamW
with CRMA's learning rate per group, ZClip's clipping (DeepSpeed clips the total norm at this
step's ZClip threshold, as `clip_grads_with_norm_` does, and reports the norm back to ZClip),
and checkpoints in the one-process format (the sharded AdamW state gathered per parameter). A
non-finite gradient norm makes DeepSpeed skip the step; the trainer then stops the domain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crma.errors import UserError

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def zero_stage(setting: int, accelerator) -> int:
    """The ZeRO stage training uses: train.deepspeed, or the stage of an accelerate launch with
    a DeepSpeed config (GPUs)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return int(accelerator.state.deepspeed_plugin.zero_stage)
    return setting


def refuse_zero(stage: int, method, world: int, checkpointing: bool = False) -> None:
    """One-line refusals for what ZeRO cannot train the same way (`checkpointing`:
    train.gradient_checkpointing)."""
    if stage == 0:
        return
    if stage not in (2, 3):
        raise UserError(
            f"train.deepspeed: ZeRO-{stage} is not supported by crma; use 2 (sharded AdamW "
            "state) or 3 (also the base), or 0"
        )
    if stage == 3 and checkpointing:  # recomputation in backward would find the base weights
        # ZeRO-3 freed after the forward (torch's checkpoint metadata check fails)
        raise UserError(
            "train.gradient_checkpointing: ZeRO-3 frees the base weights that recomputation "
            "needs; set it false, or shard the base with train.fsdp and recompute"
        )
    if world < 2:
        raise UserError(
            "train.deepspeed: shards over several processes; launch with torchrun --standalone "
            "--nproc_per_node N -m crma ... (or set train.deepspeed: 0)"
        )
    if not method.zero:
        raise UserError(
            f"train.deepspeed: method {method.name!r} edits its trained weights in place after "
            f"each step, which ZeRO-{stage}'s sharded copy of them would undo; train it "
            "data-parallel (train.deepspeed: 0)"
        )


class ZeroOptimizer:
    """One domain's DeepSpeed engine (ZeRO `stage` 2 or 3) around crma's model and AdamW, with
    the optimizer's interface the trainer uses (param_groups, state_dict, load_state_dict).
    `whole`: the parameters ZeRO-3 keeps whole on every process (adapters and backbone)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.AdamW,
        grad_accum: int,
        stage: int = 2,
        whole: set[nn.Parameter] = frozenset(),
    ):
        try:
            import deepspeed
        except ImportError as exc:
            raise UserError(
                "train.deepspeed: needs the deepspeed package (pip install 'crma[distributed]')"
            ) from exc
        # Its shared-memory all-reduce serves inference only and is compiled (C++) on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.stage, self.model, self.inner = stage, model, optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.counts = [len(group["params"]) for group in optimizer.param_groups]
        zero: dict[str, Any] = {"stage": stage}
        if stage == 3:  # `whole` (and base tensors no larger) persist: never partitioned
            zero["stage3_param_persistence_threshold"] = max(p.numel() for p in whole)
        self.own_attributes = {p: set(vars(p)) for p in model.parameters()}  # before DeepSpeed's
        config = {
            "train_micro_batch_size_per_gpu": 1,  # crma batches itself
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": 0.0,  # set per step from ZClip
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch's AdamW, no compiled optimizer
        }
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        # the part of the base this process holds while steps run (ZeRO-3)
        self.base_share = _held_share(model, whole) if stage == 3 else None
        self.hook = self._keep_whole() if stage == 3 else None

    def _keep_whole(self):
        """Gather the persistent parameters (adapters, backbone) now and after every forward;
        return the hook. DeepSpeed gathers them after each step, but while it records a step's
        first trace it frees them after their module's forward, and a method's extra loss
        reads them after the model's. (A collective: every process runs the same forwards.)"""
        persistent = self.zero.persistent_parameters

        def gather(*_) -> None:
            persistent[0].all_gather(persistent)

        gather()
        return self.model.register_forward_hook(gather)

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
        if self.stage == 3:  # and DeepSpeed's own shards, which its forward and backward gather
            self.params[0].partition(self.params, has_been_updated=True)
            self.params[0].all_gather(self.params)
        state = state_dict["state"]
        if not state:
            return
        step = next(iter(state.values()))["step"]
        for flat in self._shards():  # AdamW's state, made before its first step
            zeros = {k: torch.zeros_like(flat) for k in ADAM_STATES}
            self.inner.state[flat] = {"step": step.clone(), **zeros}
        self._link_states()
        for index, param in enumerate(self.params):
            for key in ADAM_STATES:
                value = state.get(index, {}).get(key, torch.zeros_like(param))
                safe_set_full_optimizer_state(param, value.to(param.device), key)

    def _shards(self) -> list[torch.Tensor]:
        """This process's float32 shards of the trained weights, which AdamW steps. (ZeRO-3
        puts them in AdamW's param groups only while it steps them.)"""
        if self.stage == 3:
            return self.zero.fp32_partitioned_groups_flat
        return [flat for group in self.inner.param_groups for flat in group["params"]]

    def _link_states(self) -> None:
        """Point each parameter at its shard of AdamW's state. (ZeRO-2 links them once, after
        the first group's first step, when the other groups have no state yet; ZeRO-3 finds
        them itself.)"""
        if self.stage != 2:
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        shards = self.zero.single_partition_of_fp32_groups
        for params, shard in zip(self.zero.bit16_groups, shards, strict=True):
            lazy_init_hp_params_optimizer_state(params, shard, self.inner.state)

    def close(self) -> None:
        """Remove DeepSpeed's hooks (the next domain makes its own engine) and give every
        parameter back as it was, whole (ZeRO-3 gathers it: a collective) and without
        DeepSpeed's attributes; the objects stay the same, which methods hold on to."""
        whole = _gathered(self.model) if self.stage == 3 else {}
        self.engine.destroy()
        if self.hook is not None:
            self.hook.remove()
        for param, own in self.own_attributes.items():
            if param in whole:
                param.data = whole[param]
            for key in set(vars(param)) - own:
                delattr(param, key)


def _held_share(model: nn.Module, whole: set[nn.Parameter]) -> float:
    """The part of the base (all but `whole`) this process holds while steps run (ZeRO-3)."""
    base = [p for p in model.parameters() if p not in whole]
    held = sum(p.ds_numel if p.ds_persist else p.ds_tensor.numel() for p in base)
    return held / sum(p.ds_numel for p in base)


def _gathered(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Each of `model`'s parameters' whole data, its partitions gathered."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {p: p.data.clone() for p in params}
