"""The domains a run trains and evaluates on, tokenized: the user's files or the embedded corpus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crma.protocol.config import RunConfig


@dataclass
class DomainData:
    name: str
    train: list[dict[str, list[int]]]
    holdout: list[dict[str, list[int]]]
    info: dict[str, Any]


def load_domains(config: RunConfig, tokenizer) -> list[DomainData]:
    """Tokenized train/holdout per domain: the user's files, or the embedded corpus."""
    from crma.data import corpus_file, ensure_corpus, load_records, tokenize_records

    cfg = config.train
    eval_len = config.eval.max_length or cfg.max_length
    if config.domains:
        specs = [(d.name, Path(d.train), Path(d.holdout), None, None) for d in config.domains]
    else:
        root = ensure_corpus()
        c = config.corpus
        specs = [
            (
                name,
                corpus_file(name, "train", root),
                corpus_file(name, c.split if c.split == "holdout" else "spare", root),
                c.train_size,
                c.holdout_size,
            )
            for name in c.order
        ]
    out = []
    for name, train_path, holdout_path, n_train, n_holdout in specs:
        train = load_records(train_path)[:n_train]
        holdout = load_records(holdout_path)[:n_holdout]
        out.append(
            DomainData(
                name,
                tokenize_records(train, tokenizer, cfg.max_length),
                tokenize_records(holdout, tokenizer, eval_len),
                {"train_file": str(train_path), "train_examples": len(train)},
            )
        )
    return out
