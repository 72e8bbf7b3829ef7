"""Quantized base weights (QLoRA): bitsandbytes 4-bit or 8-bit, on CUDA GPUs.

4-bit is QLoRA's recipe (Dettmers et al., 2023): NF4 weights with double quantization, bf16
compute; the packed weights are stored as bf16 so that FSDP can shard them beside the bf16
parameters (configs/accelerate/qlora-fsdp2.yaml). Adapters and the CRMA backbone stay in float.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from crma.errors import UserError

LoadIn = Literal["float", "8bit", "4bit"]


def quantization_config(load_in: LoadIn, base: str, flag: str = ""):
    """transformers' BitsAndBytesConfig for `load_in` (None for float), or a UserError naming
    `flag` (the option or setting that asked) and why this machine or base cannot load it."""
    if load_in == "float":
        return None
    flag = flag or f"load_in: {load_in}"
    if base.endswith(".gguf"):
        raise UserError(
            f"{flag}: {base} is a GGUF file (dequantized to float on load); quantized loading "
            "takes a Hugging Face model folder or hub name"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"{flag}: bitsandbytes quantization needs a CUDA GPU; this machine has none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag}: needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def loaded_as(model: torch.nn.Module) -> LoadIn:
    """How `model`'s base weights are held, from the marks transformers leaves on a
    bitsandbytes load (recorded in metrics lines and the stack's manifest)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "is_loaded_in_4bit", False):
        return "4bit"
    return "8bit" if getattr(inner, "is_loaded_in_8bit", False) else "float"
