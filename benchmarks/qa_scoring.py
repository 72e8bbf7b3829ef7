"""QA scoring speed: each prompt run once with its options on the prompt's KV cache (what
`crma.eval.qa.score_choices` does) against every option scored as a whole prompt + option
sequence (the way crma scored until 2026-12: sequences batched by length, `--batch` sequences per
pass, as its default was), on the embedded base model.

The arms alternate (A/B/A/B...) on the same items, so machine noise hits both alike; both
must pick the same options. Per item kind (continuation probes, MMLU questions) of one
corpus domain: median seconds per arm, their ratio, and tokens run per arm. Writes OUT.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qa_scoring.py [--domain legal] [--items 64]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from crma import load_base
from crma.batching import pad, pad_id
from crma.data.corpus import corpus_file
from crma.eval.qa import option_scores, prompt_and_options, read_items


@torch.inference_mode()
def whole_sequence_scores(model, tokenizer, items, batch_size: int) -> list[list[float]]:
    """Every option as prompt + option in one sequence, sequences batched by length."""
    sequences, owners = [], []
    for n, item in enumerate(items):
        prompt, options = prompt_and_options(item)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        for option in options:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            sequences.append((prompt_ids + option_ids, len(prompt_ids)))
            owners.append(n)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    means = [0.0] * len(sequences)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        ids, mask = pad([sequences[i][0] for i in rows], pad_id(tokenizer))
        logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        for r, i in enumerate(rows):
            seq, start = sequences[i]
            targets = torch.tensor(seq[start:])
            means[i] = logp[r, start - 1 : len(seq) - 1].gather(-1, targets[:, None]).mean().item()
    scores: list[list[float]] = [[] for _ in items]
    for n, mean in zip(owners, means):
        scores[n].append(mean)
    return scores


def tokens_run(tokenizer, items, shared: bool) -> int:
    total = 0
    for item in items:
        prompt, options = prompt_and_options(item)
        p = len(tokenizer(prompt)["input_ids"])
        o = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in options]
        total += p + sum(o) if shared else len(o) * p + sum(o)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", default="legal", help="corpus domain (default: legal)")
    parser.add_argument("--items", type=int, default=64, help="items per kind (default: 64)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per kind (default: 3)")
    parser.add_argument("--batch", type=int, default=8, help="QA batch size (default: 8)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/qa-scoring"))
    args = parser.parse_args()

    model, tokenizer = load_base("embedded")
    model.eval()
    arms = {
        "shared prompt": lambda items: option_scores(model, tokenizer, items, args.batch),
        "whole sequences": lambda items: whole_sequence_scores(model, tokenizer, items, args.batch),
    }
    lines = [
        "# QA scoring: shared prompt vs whole sequences",
        "",
        f"`{shlex.join(['python', *sys.argv])}` (torch threads: {torch.get_num_threads()})",
        "",
        "| items | shared prompt (s) | whole sequences (s) | speed-up | tokens shared / whole |",
        "|---|---|---|---|---|",
    ]
    for kind in ("probes", "mmlu"):
        items = read_items(corpus_file(args.domain, kind))[: args.items]
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        picks = {}
        for _ in range(args.pairs):
            for arm, score in arms.items():
                start = time.perf_counter()
                picks[arm] = [int(np.argmax(s)) for s in score(items)]
                seconds[arm].append(time.perf_counter() - start)
        assert picks["shared prompt"] == picks["whole sequences"], "the arms chose differently"
        a, b = (statistics.median(seconds[arm]) for arm in arms)
        tokens = f"{tokens_run(tokenizer, items, True)} / {tokens_run(tokenizer, items, False)}"
        row = f"| {len(items)} {args.domain} {kind} | {a:.2f} | {b:.2f} | {b / a:.2f}× | {tokens} |"
        print(row, flush=True)
        lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"{args.out}.md")


if __name__ == "__main__":
    main()
