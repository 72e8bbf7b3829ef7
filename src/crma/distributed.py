"""Data-parallel training on several processes, through accelerate.

crma has no distributed layer of its own. `torchrun --standalone --nproc_per_node N -m crma run|train`
starts N processes (gloo on CPUs, NCCL on GPUs); on GPUs `accelerate launch --config_file
configs/accelerate/ddp.yaml -m crma ...` does the same. (`accelerate launch --cpu
--num_processes N` starts ONE process: without an MPI hostfile accelerate's CPU launch is its
simple launcher.) Every process holds the whole model and the whole global batch, trains on its
shard of each batch, and DDP averages the gradients, so all processes keep identical weights.
Only the main process writes (metrics, checkpoints, commits, caches); the others re-read the
stack's manifest after each commit, so every process starts the next domain from the same
committed state.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch

from crma.errors import UserError

_PR_SET_PDEATHSIG = 1


def make_accelerator(mixed_precision: str):
    """The accelerator of a training command, distributed when a launcher started it.

    accelerate takes torchrun's WORLD_SIZE on a machine without GPUs only when told `cpu`:
    otherwise every process believes it is rank 0 of 1 and all of them write. One process
    keeps accelerate's own choice of device.
    """
    from accelerate import Accelerator

    launched = "LOCAL_RANK" in os.environ
    if launched:
        _die_with_launcher()
    cpu = launched and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _die_with_launcher() -> None:
    """A worker dies with its launcher (even on SIGKILL), so a rerun finds no orphan still
    training and holding the stack's lock; it resumes from the last checkpoint instead."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def refuse_unsupported(
    method, accelerator, fsdp: bool = False, deepspeed: int = 0, checkpointing: bool = False
) -> None:
    """Methods whose result would depend on the number of processes refuse more than one;
    FSDP (`fsdp`: train.fsdp) needs several processes and base weights that stay fixed;
    DeepSpeed (`deepspeed`: train.deepspeed, or the stage of an accelerate DeepSpeed launch)
    is refused as `crma.zero.refuse_zero` says (`checkpointing`: train.gradient_checkpointing)."""
    from accelerate.utils import DistributedType

    from crma.zero import refuse_zero, zero_stage

    world = accelerator.num_processes
    if world > 1 and not method.data_parallel:
        raise UserError(
            f"method {method.name!r} would not give the same result on {world} processes as on "
            "one; run it in one process (without torchrun / accelerate launch)"
        )
    kind = accelerator.distributed_type
    if kind not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    ):
        raise UserError(
            f"distributed type {kind.value}: crma trains data-parallel (DDP), with FSDP2 or "
            "DeepSpeed ZeRO-2 or ZeRO-3 only; use a config in configs/accelerate/, or torchrun"
        )
    refuse_zero(zero_stage(deepspeed, accelerator), method, world, checkpointing)
    if not uses_fsdp(fsdp, accelerator):
        return
    if not method.fsdp:
        raise UserError(
            f"train.fsdp: method {method.name!r} merges its adapters into the base weights, "
            "which FSDP shards; train it data-parallel (train.fsdp: false)"
        )
    if world < 2:
        raise UserError(
            "train.fsdp: shards the base over several processes; launch with torchrun "
            "--standalone --nproc_per_node N -m crma ... (or set train.fsdp: false)"
        )


def uses_fsdp(fsdp: bool, accelerator) -> bool:
    """Whether training shards the base (crma.fsdp): train.fsdp, or accelerate's FSDP type
    (configs/accelerate/fsdp2.yaml on GPUs; accelerate keeps CPUs data-parallel)."""
    from accelerate.utils import DistributedType

    return fsdp or accelerator.distributed_type == DistributedType.FSDP


def label_tokens(examples: list[dict[str, list[int]]]) -> int:
    """Tokens the causal-LM loss counts in `examples`: labels after the one-token shift."""
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


def gather_rows(accelerator, values: list[float]) -> list[list[float]]:
    """`values` of every process, one row per rank (float64: the same rows on every process)."""
    mine = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        mine = accelerator.gather(mine)
    return mine.tolist()
