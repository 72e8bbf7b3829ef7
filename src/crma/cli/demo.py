"""`crma demo`: load the embedded model, attach CRMA, show parameter counts and a generation."""

from __future__ import annotations

import argparse

import torch

from crma.backbone import CRMAConfig, attach_crma
from crma.model import EMBEDDED, load_base
from crma.settings import add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="load a model, attach CRMA, print parameter counts and a generation"
    )
    p.add_argument(
        "--base", default=EMBEDDED, help="base model: 'embedded', a HF folder or a .gguf file"
    )
    p.add_argument("--prompt", default="What does the heart do?", help="prompt to generate from")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    add_arguments(p, CRMAConfig, prefix="crma_")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    model, tokenizer = load_base(args.base)
    base_params = sum(p.numel() for p in model.parameters())
    backbone = attach_crma(model, from_args(CRMAConfig, args, prefix="crma_"))
    crma_params = sum(p.numel() for p in backbone.parameters())
    cfg = backbone.config
    print(f"base model       {args.base}: {base_params:,} parameters, {backbone.n_layers} layers")
    print(
        f"CRMA backbone    {crma_params:,} parameters ({crma_params / base_params:.3%} of base), "
        f"n={cfg.n_streams} streams, variant={cfg.variant}"
    )
    stats = backbone.spectral_stats()
    print(
        f"mixing matrices  max ‖M‖₂ = {stats['spectral_norm_max']:.6f}, "
        f"max |row sum − 1| = {stats['rowsum_err_max']:.1e}, max |col sum − 1| = {stats['colsum_err_max']:.1e}"
    )
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"prompt           {args.prompt}")
    print(f"generation       {reply.strip()}")
