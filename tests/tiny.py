"""Tiny models and a tiny tokenizer built locally (no downloads) for fast tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 512
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The heart pumps blood through the body. A licence grants rights to use software.",
    "Interest rates affect bond prices and inflation. def add(a, b): return a + b",
    "Energy is conserved in a closed system; the derivative of x squared is two x.",
    "Patients with fever and cough may have an infection of the lungs or airways.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with 512 tokens and a ChatML template; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama"):
    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        return GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=2,
            **common,
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[family]
    return cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        head_dim=16,
        **common,
    )


FAMILIES = ["llama", "qwen2", "gemma", "gpt2"]


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    return model
