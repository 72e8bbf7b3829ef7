"""Tiny stacks on tiny *distinct* domains (other words, not other answers), for routing tests."""

from __future__ import annotations

import random
from pathlib import Path

from helpers import TINY_BASE

WORDS = {
    "medic": [
        "heart",
        "blood",
        "patients",
        "fever",
        "cough",
        "lungs",
        "infection",
        "body",
        "airways",
        "pumps",
    ],
    "money": ["interest", "rates", "bond", "prices", "inflation", "affect", "grants", "rights"],
    "code": ["def", "add", "(", "a", ",", "b", ")", ":", "return", "a", "+", "b", "x"],
    "physics": ["energy", "conserved", "closed", "system", "derivative", "squared", "two"],
    "asking": ["why", "does", "what", "orbit", "gravity", "photon", "quantum", "?", "tell"],
}


def texts(domain: str, n: int, seed: int) -> list[str]:
    """`n` sentences of 8–16 words drawn from the domain's own words only."""
    rng = random.Random(f"{domain}:{seed}")
    return [" ".join(rng.choices(WORDS[domain], k=rng.randint(8, 16))) + "." for _ in range(n)]


def build_stack(
    path: Path,
    domains: list[str],
    method: str = "crma",
    steps: int = 6,
    sources: dict[str, str] | None = None,
):
    """Train `domains` in order into a stack at `path` (in-process, a few steps each); a
    domain's texts come from the words of `sources[domain]` (default: its own name)."""
    from accelerate import Accelerator

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data import tokenize_records
    from crma.engine import LoraSettings
    from crma.model import base_model_id, load_base
    from crma.train import TrainConfig

    spec = StackSpec(method, {}, LoraSettings(r=4, alpha=8), CRMAConfig())
    cm = ContinualModel.open_or_create(
        path, lambda: load_base(str(TINY_BASE)), base_model_id(str(TINY_BASE)), spec
    )
    cfg = TrainConfig(
        lr=0.03,
        batch_size=8,
        max_steps=steps,
        max_length=32,
        precision="fp32",
        checkpoint_every=100,
    )
    acc = Accelerator(cpu=True)
    for d in domains:
        records = [{"text": t} for t in texts((sources or {}).get(d, d), 40, seed=0)]
        examples = tokenize_records(records, cm.engine.tokenizer, cfg.max_length)
        cm.add_domain(
            d, examples, cfg, acc, 0, path / "metrics.jsonl", {"method": method, "seed": 0}
        )
    return cm


def commit_router(cm, router) -> None:
    """Commit `router` as the stack's (as an older crma might have written it)."""
    with cm.writing():
        commit = cm.stack.begin_commit()
        router.save(commit)
        commit.finish()
