"""FSDP2 (torch's `fully_shard`): the frozen base sharded over the processes while steps run.

`train.fsdp: true` under `torchrun --nproc_per_node N` (gloo on CPUs), or an accelerate launch
with configs/accelerate/fsdp2.yaml on GPUs, shards every decoder layer, then the root
(embeddings, norm, head), as torchtitan and torchtune do. Only the base weights are sharded:
the LoRA adapters and the CRMA backbone are FSDP's ignored parameters, replicated on every
process, their gradients averaged by one all-reduce per step (`average_gradients`). They are
a few MB, and replicated they stay plain tensors, so the optimizer, ZClip's total norm,
checkpoints, resume and the stack's files are exactly those of a one-process run, and CRMA's
hooks and autograd functions see ordinary tensors.

While a domain's steps run, each process holds 1/N of the base and all-gathers one layer at a
time. Around them (the method's begin/end of a domain, evaluation, commits, which run on the
main process alone) the base is gathered in full on every process, so forward passes need no
collective: peak memory is the full base plus evaluation's activations, not plus training's.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from crma.backbone import decoder_layers
from crma.distributed import gather_rows
from crma.engine import Engine


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules `fully_shard` was applied to, in the same order on every process."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_base(engine: Engine, accelerator) -> list[float]:
    """Shard the base for training steps; return the fraction of its weights each process
    now holds (1/N). `fully_shard` on first use, after moving the model to the accelerator's
    device (FSDP leaves ignored parameters where they are); later, free the gathered weights.
    Every process calls this at the same point."""
    modules = fsdp_modules(engine.base)
    if not modules:
        engine.model.to(accelerator.device)
        ignored = engine.added_parameters()
        for layer in decoder_layers(engine.base):
            fully_shard(layer, ignored_params=ignored)
        fully_shard(engine.base, ignored_params=ignored)
        # CRMA's residual (backbone._LowRankResidual) returns a view; nothing changes a layer's
        # output in place (the next layer adds its residual out of place), which FSDP warns of.
        warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    for module in fsdp_modules(engine.base):
        module.set_reshard_after_forward(True, recurse=False)
        module.reshard()
    sharded = [p for p in engine.base.parameters() if isinstance(p, DTensor)]
    mine = sum(p.to_local().numel() for p in sharded) / sum(p.numel() for p in sharded)
    return [row[0] for row in gather_rows(accelerator, [mine])]


def gather_base(engine: Engine) -> None:
    """All-gather the whole base on every process and keep it until the next `shard_base`."""
    for module in fsdp_modules(engine.base):
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
        _full_state_dicts(module)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the replicated parameters' gradients over the processes (one all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat /= world
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def _full_state_dicts(module: FSDPModule) -> None:
    """Gathered weights stay gathered through `state_dict()`: FSDP would reshard first, on the
    one process that saves an adapter, whose next forward would then wait for an all-gather
    the other processes never join."""
    for group in module._get_fsdp_state()._fsdp_param_groups:
        for handle in group._module_to_pre_save_state_dict_hook_handle.values():
            handle.remove()
