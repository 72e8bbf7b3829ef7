"""CRMA overhead: training-step time and memory with vs without CRMA, in one process.

Embedded model, LoRA r=8 on q/v, batch 8 x 128 tokens. The two arms alternate (A/B/A/B...)
on the same weights (`backbone.enabled` toggles CRMA), so machine noise hits both alike.
Memory is counted exactly rather than read from RSS (which only grows within a process):
activations saved for backward + trainable parameters, their gradients and AdamW state.

    .venv/bin/python benchmarks/overhead.py [--pairs 10] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from crma import attach_crma, load_base


def saved_activation_bytes(step) -> int:
    """Bytes of distinct tensors autograd keeps for backward (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=10, help="A/B pairs to time (after 2 warm-up pairs)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()

    model, _ = load_base("embedded")
    backbone = attach_crma(model)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    for p in backbone.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(
        [
            {
                "params": [
                    p for n, p in model.named_parameters() if p.requires_grad and "crma" not in n
                ]
            }
        ]
        + backbone.param_groups(),
        lr=1e-4,
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def static_bytes(enabled: bool) -> int:
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and (enabled or "crma" not in n)
        ]
        return sum(p.numel() * p.element_size() for p in params) * 4  # weights, grads, Adam m and v

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.pairs + 2):
        for enabled in (False, True):
            backbone.enabled = enabled
            start = time.perf_counter()
            step()
            if i >= 2:
                times[enabled].append(time.perf_counter() - start)
    memory = {}
    for enabled in (False, True):
        backbone.enabled = enabled
        memory[enabled] = saved_activation_bytes(step) + static_bytes(enabled)

    base_t, crma_t = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"threads {torch.get_num_threads()}, batch {args.batch} x {args.seq}, bf16={args.bf16}, pairs={args.pairs}"
    )
    print(
        f"step time   LoRA {base_t:.3f} s   LoRA+CRMA {crma_t:.3f} s   ratio {crma_t / base_t:.4f}"
    )
    print(
        f"train memory LoRA {memory[False] / 2**20:.1f} MiB   LoRA+CRMA {memory[True] / 2**20:.1f} MiB   "
        f"ratio {memory[True] / memory[False]:.4f}   (activations + trainable state; base weights "
        f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MiB not counted)"
    )


if __name__ == "__main__":
    main()
