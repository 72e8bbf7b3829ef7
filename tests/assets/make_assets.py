"""Regenerate the tiny test assets: a random 2-layer Llama and three conflicting domains.

    .venv/bin/python tests/assets/make_assets.py

The domains share their prompts ("colour of the heart is") but not their answers, so a single
LoRA trained on them in turn must overwrite what it learned first: forgetting is guaranteed.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

SUBJECTS = [
    "heart",
    "blood",
    "licence",
    "software",
    "bond",
    "price",
    "energy",
    "system",
    "fever",
    "lungs",
]
ANSWERS = {
    "alpha": ["red", "warm", "closed", "prices"],
    "beta": ["blue", "cold", "open", "rates"],
    "gamma": ["green", "dry", "fast", "bonds"],
}


def domain_rows(domain: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{domain}:{seed}")
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        words = " ".join(rng.choice(ANSWERS[domain]) for _ in range(6))
        rows.append({"text": f"the colour of the {subject} is {words}."})
    return rows


def main() -> None:
    model_dir = HERE / "tiny-llama"
    tiny_model("llama", seed=0).save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(model_dir)
    data = HERE / "tiny-domains"
    data.mkdir(exist_ok=True)
    for domain in ANSWERS:
        for split, n, seed in (("train", 48, 0), ("holdout", 16, 1)):
            lines = [json.dumps(r) for r in domain_rows(domain, n, seed)]
            (data / f"{domain}.{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
