"""A 7B-shaped GPU check: CRMA's step-time and memory cost and its spectral bound at scale.

A randomly initialised Mistral-7B-shaped model built from its config (no download), bf16, LoRA
r = 16 on the attention and MLP projections, the CRMA backbone attached. The two arms share one
model and alternate step by step (`backbone.enabled` on / off), so clock drift and allocator
state hit both alike. Per arm: median step time, tokens/s and peak GPU memory; for CRMA the
largest |‖M‖₂ − 1| over every step. Then the same with a 4-bit base (bitsandbytes NF4, bf16
compute), when bitsandbytes is installed. Prints one markdown table (and writes it to --out).

    python benchmarks/gpu_check.py [--steps 50] [--batch 4] [--seq 1024] [--out FILE]
    python benchmarks/gpu_check.py --tiny --steps 3    # the tests' 2-layer Llama on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from crma import CRMAConfig, attach_crma

# Mistral-7B-v0.1's shape (config.json of mistralai/Mistral-7B-v0.1), written out: no download.
MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "sliding_window": None,
}
TINY = Path(__file__).resolve().parents[1] / "tests/assets/tiny-llama"  # the tests' 2-layer Llama
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Arm:
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def build(tiny: bool, device: torch.device, dtype: torch.dtype, four_bit: bool):
    """The random base (4-bit through a save/load round trip: bitsandbytes quantizes on load)."""
    config = AutoConfig.from_pretrained(TINY) if tiny else MistralConfig(**MISTRAL_7B)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not four_bit:
        return model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # what FSDP needs to shard the quantized weights
    )
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype)


@contextmanager
def timed(device: torch.device, arm: Arm):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        arm.peak_bytes = max(arm.peak_bytes, torch.cuda.max_memory_allocated())
    arm.seconds.append(time.perf_counter() - start)


def run_arms(model, backbone, args, device) -> tuple[Arm, Arm, float]:
    """(crma arm, plain-LoRA arm, max |‖M‖₂ − 1| over the CRMA steps)."""
    cfg = backbone.config
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if "lora_" in n], "lr": 1e-4},
            {"params": [backbone.read_weights, backbone.write_weights], "lr": cfg.lr_projections},
            {"params": [backbone.log_mix], "lr": cfg.lr_mix},
            {"params": [backbone.log_alpha], "lr": cfg.lr_gate},
        ]
    )
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    arms = {True: Arm(), False: Arm()}
    worst = 0.0
    for step in range(args.warmup + args.steps):
        for enabled in (True, False):
            ids = torch.randint(vocab, (args.batch, args.seq), generator=gen).to(device)
            backbone.enabled = enabled
            arm = arms[enabled] if step >= args.warmup else Arm()
            with timed(device, arm):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if enabled:
                worst = max(worst, abs(backbone.spectral_stats()["spectral_norm_max"] - 1))
    backbone.enabled = True
    return arms[True], arms[False], worst


def measure(args, device: torch.device, four_bit: bool) -> dict:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build(args.tiny, device, dtype, four_bit)
    backbone = attach_crma(model, CRMAConfig(n_streams=4))
    backbone.to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for p in backbone.parameters():
        p.requires_grad_(True)
    model.train()
    on, off, worst = run_arms(model, backbone, args, device)
    tokens = args.batch * args.seq
    t_on, t_off = statistics.median(on.seconds), statistics.median(off.seconds)
    result = {
        "base": ("4-bit NF4" if four_bit else str(dtype).removeprefix("torch.")),
        "step_on": t_on,
        "step_off": t_off,
        "time_ratio": t_on / t_off,
        "tokens_on": tokens / t_on,
        "tokens_off": tokens / t_off,
        "peak_on": on.peak_bytes,
        "peak_off": off.peak_bytes,
        "memory_ratio": on.peak_bytes / off.peak_bytes if off.peak_bytes else None,
        "spectral_dev": worst,
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
    }
    del model, backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(rows: list[dict], args) -> str:
    shape = "tiny 2-layer Llama" if args.tiny else "Mistral-7B-shaped (random init)"
    lines = [
        f"{shape}, LoRA r=16 on {', '.join(TARGETS)}, CRMA n=4; batch {args.batch} × "
        f"{args.seq} tokens; medians over {args.steps} interleaved steps per arm after "
        f"{args.warmup} warm-up pairs.",
        "",
        "| base | step on / off (s) | overhead | tokens/s on / off | peak GiB on / off | "
        "memory overhead | max abs(‖M‖₂ − 1) | backbone / LoRA params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['base']} | skipped: {r['skipped']} |" + " |" * 6)
            continue
        mem = f"{100 * (r['memory_ratio'] - 1):+.2f} %" if r["memory_ratio"] else "–"
        lines.append(
            f"| {r['base']} | {r['step_on']:.4f} / {r['step_off']:.4f} | "
            f"{100 * (r['time_ratio'] - 1):+.2f} % | {r['tokens_on']:,.0f} / {r['tokens_off']:,.0f} | "
            f"{r['peak_on'] / 2**30:.2f} / {r['peak_off'] / 2**30:.2f} | {mem} | "
            f"{r['spectral_dev']:.1e} | {r['backbone_params']:,} / {r['lora_params']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed step pairs first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 32)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny for a CPU smoke run")
    rows = [measure(args, device, four_bit=False)]
    try:
        import bitsandbytes  # noqa: F401

        four_bit_ok = device.type == "cuda"
    except ImportError:
        four_bit_ok = False
    if four_bit_ok:
        rows.append(measure(args, device, four_bit=True))
    else:
        reason = "needs CUDA" if device.type != "cuda" else "bitsandbytes not installed"
        rows.append({"base": "4-bit NF4", "skipped": reason})
    text = table(rows, args)
    print(text)
    if args.out:
        from crma.fileio import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
