"""Base-model accuracy on each domain's continuation probes (and, optionally, MMLU subsets).

Every trained model's QA accuracy is read against this: it is what the untrained base already
knows. Usage (builds the embedded corpus first if needed):

    .venv/bin/python benchmarks/probe_baseline.py [--base embedded] [--mmlu 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crma.data import DOMAINS, corpus_file, ensure_corpus
from crma.eval.qa import score_choices
from crma.eval.stats import accuracy, wilson_interval
from crma.fileio import write_json
from crma.model import load_base


def evaluate(model, tokenizer, items: list[dict], batch_size: int) -> dict:
    predictions = score_choices(model, tokenizer, items, batch_size=batch_size)
    correct = round(accuracy(items, predictions) * len(items))
    low, high = wilson_interval(correct, len(items))
    return {
        "n": len(items),
        "correct": correct,
        "accuracy": correct / len(items),
        "ci95": [low, high],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="embedded", help="model to score")
    parser.add_argument("--mmlu", type=int, default=0, help="also score the first N MMLU items")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = ensure_corpus()
    model, tokenizer = load_base(args.base)
    model.eval()
    results: dict[str, dict] = {}
    splits = ["probes"] + (["mmlu"] if args.mmlu else [])
    for domain in DOMAINS:
        for split in splits:
            items = read_items(corpus_file(domain, split, root))
            items = items[: args.mmlu] if split == "mmlu" else items
            start = time.monotonic()
            result = evaluate(model, tokenizer, items, args.batch_size)
            result["seconds"] = round(time.monotonic() - start, 1)
            results.setdefault(domain, {})[split] = result
            low, high = result["ci95"]
            print(
                f"{domain:<10} {split:<7} {result['accuracy']:6.1%}  [{low:.1%}, {high:.1%}]  "
                f"n={result['n']}  ({result['seconds']:.0f} s)",
                flush=True,
            )
    if args.out:
        write_json(args.out, {"base": args.base, "corpus": str(root), "results": results})


def read_items(path) -> list[dict]:
    """QA items are JSONL but not training records, so they skip the record validation."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


if __name__ == "__main__":
    main()
