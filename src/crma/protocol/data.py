"""The domains a run trains and evaluates on, tokenized: the user's files or the embedded corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crma.protocol.config import RunConfig


@dataclass
class DomainData:
    name: str
    train: list[dict[str, list[int]]]
    holdout: list[dict[str, list[int]]]
    info: dict[str, Any]
    route: list[dict[str, list[int]]] = field(default_factory=list)  # route examples


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
                route_questions(name, config, tokenizer) if n_train is not None else [],
            )
        )
    return out


def route_questions(domain: str, config: RunConfig, tokenizer) -> list[dict[str, list[int]]]:
    """`eval.route_questions` of the domain's unscored MMLU questions, as QA prompts; refused
    if the run's QA would score one of them."""
    from crma.data import corpus_file
    from crma.errors import UserError
    from crma.eval.qa import QASettings, pick, prompt_and_options, read_items, unscored_questions

    n = config.eval.route_questions
    if not n:
        return []
    mmlu = read_items(corpus_file(domain, "mmlu"))
    stored = unscored_questions(mmlu, part=0)[:n]
    scored = {i["id"] for i in pick(mmlu, QASettings(mmlu_limit=config.eval.qa_mmlu))}
    if config.eval.qa and scored & {i["id"] for i in stored}:
        raise UserError(
            f"eval.route_questions: {domain}'s route questions include MMLU questions that "
            f"eval.qa_mmlu={config.eval.qa_mmlu} scores; use a divisor of 300 for eval.qa_mmlu"
        )
    return [{"input_ids": tokenizer(prompt_and_options(i)[0])["input_ids"]} for i in stored]
