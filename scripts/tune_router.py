"""Choose the centroid router's settings on the validation split (carved from `spare`).

    .venv/bin/python scripts/tune_router.py [--validation 560] [--max-length 128]

Embeds each corpus domain's training texts (the first `max_examples` of the train split, as a
stack's router does) and validation texts (the first N of `spare`, never the holdout) with the
frozen embedded base, for every hidden layer and head in the grid, and scores top-1 per domain.
Rule: the highest worst-domain top-1, then the highest mean, then the cheaper setting (shallower
layer, fewer stored examples), then the stronger L2. Writes results/tuning/router.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

LAYERS = [2, 4, 8, 15]
MAX_EXAMPLES = [128, 500]
HEADS = [("prototype", None), *(("logistic", l2) for l2 in (1e-4, 1e-3, 1e-2, 1e-1))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=560,
        help="validation texts per domain (science's spare split has 562; the first 100 of "
        "financial's held 1 of its 12 Wikipedia passages, too few to tell settings apart)",
    )
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per text (the stored router's)"
    )
    parser.add_argument("--out", default="results/tuning/router", help="output path stem")
    args = parser.parse_args()

    from crma.data import DOMAINS, corpus_file, load_records, tokenize_records
    from crma.engine import Engine, LoraSettings
    from crma.fileio import write_json, write_text
    from crma.model import EMBEDDED, load_base
    from crma.route import CentroidRouter, CentroidSettings, embed

    model, tokenizer = load_base(EMBEDDED)
    engine = Engine(model, tokenizer, LoraSettings(), None)

    def ids(domain: str, split: str, n: int) -> list[list[int]]:
        records = load_records(corpus_file(domain, split))[:n]
        return [e["input_ids"] for e in tokenize_records(records, tokenizer, args.max_length)]

    domains = list(DOMAINS)
    train = {d: ids(d, "train", max(MAX_EXAMPLES)) for d in domains}
    val = {d: ids(d, "spare", args.validation) for d in domains}
    trials = []
    for layer in LAYERS:
        e_train = {d: embed(engine, x, layer, args.max_length) for d, x in train.items()}
        e_val = {d: embed(engine, x, layer, args.max_length) for d, x in val.items()}
        for n, (head, l2) in itertools.product(MAX_EXAMPLES, HEADS):
            settings = CentroidSettings(layer, args.max_length, n, head, l2 or 0.0)
            router = CentroidRouter(settings)
            for d in domains:
                router.add(d, e_train[d][:n])
            top1 = {
                d: (router.scores(e_val[d]).argmax(-1) == k).double().mean().item()
                for k, d in enumerate(domains)
            }
            trials.append({"settings": dataclasses.asdict(settings), "top1": top1})
            print(f"layer {layer:>2} examples {n:>3} {head:<9} l2 {l2 or 0:<6g} {fmt(top1)}")
    best = max(trials, key=rank)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"args": vars(args), "trials": trials, "selected": best})
    write_text(out.with_suffix(".md"), markdown(trials, best, domains, args))
    print(f"selected: {best['settings']} -> {out.with_suffix('.md')}")


def rank(trial: dict) -> tuple:
    s, top1 = trial["settings"], trial["top1"].values()
    return (min(top1), sum(top1), -s["layer"], -s["max_examples"], s["l2"])


def fmt(top1: dict[str, float]) -> str:
    return " ".join(f"{d} {v:.0%}" for d, v in top1.items())


def markdown(trials: list[dict], best: dict, domains: list[str], args) -> str:
    lines = [
        "# Router trials: centroid settings on the validation split",
        "",
        f"`scripts/tune_router.py --validation {args.validation} --max-length {args.max_length}`: "
        f"top-1 (%) on the first {args.validation} `spare` texts per domain, routers built from "
        "the first `examples` train texts (frozen embedded base, mean-pooled hidden state).",
        "",
        "| layer | examples | head | l2 | " + " | ".join(domains) + " | worst | mean |",
        "|---" * (len(domains) + 6) + "|",
    ]
    for t in trials:
        s, v = t["settings"], list(t["top1"].values())
        mark = " **(selected)**" if t is best else ""
        lines.append(
            f"| {s['layer']} | {s['max_examples']} | {s['head']}{mark} | "
            f"{s['l2'] if s['head'] == 'logistic' else '–'} | "
            + " | ".join(f"{100 * x:.1f}" for x in v)
            + f" | {100 * min(v):.1f} | {100 * sum(v) / len(v):.2f} |"
        )
    lines += [
        "",
        "Rule: highest worst-domain top-1, then highest mean, then shallower layer, fewer "
        "examples, stronger L2.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
