"""Routing: the stored centroid router's accuracy on the evaluation sets, and its overhead.

`accuracy`: builds the centroid router of the given settings (default: today's) from each
corpus domain's training file, as a stack does, and routes the evaluation sets: the holdout
passages, the continuation-probe prompts, and the MMLU questions that QA scores (the 300
spread over each domain's subjects, `crma.eval.qa.spread`; `eval.qa_mmlu` of 50, 100 or 150
scores a subset of them) as QA prompts ("Question: …\nAnswer:") and as the bare question.
Writes per-domain top-1, fallbacks and confusions to OUT.json and OUT.md, with the command.

`overhead`: builds a small crma stack in a temporary folder on the embedded model (a few
training steps per corpus domain: the weights do not matter for timing), then alternates the
two arms on the same prompts (A/B/A/B…, so machine noise hits both alike): `domain=<the right
one>` (no routing) and `domain="auto"` (the stored centroid router picks it). Both generate
exactly `--new-tokens` tokens greedily. Prints median seconds per arm and their ratio (target
≤ 1.05), and the centroid router's top-1 on a few holdout texts per domain as a sanity check.

    .venv/bin/python benchmarks/routing.py accuracy [--out results/routing/router-eval]
    nice -n 10 .venv/bin/python benchmarks/routing.py overhead [--pairs 5] [--domains medical,code]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch


def build_stack(path: Path, domains: list[str], steps: int, n_examples: int):
    from accelerate import Accelerator

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data import corpus_file, load_records, tokenize_records
    from crma.engine import LoraSettings
    from crma.model import EMBEDDED, base_model_id, load_base
    from crma.train import TrainConfig

    spec = StackSpec("crma", {}, LoraSettings(), CRMAConfig())
    cm = ContinualModel.open_or_create(path, load_base, base_model_id(EMBEDDED), spec)
    cfg = TrainConfig(batch_size=4, max_steps=steps, max_length=64, precision="fp32")
    acc = Accelerator(cpu=True)
    for d in domains:
        records = load_records(corpus_file(d, "train"))[:n_examples]
        examples = tokenize_records(records, cm.engine.tokenizer, cfg.max_length)
        cm.add_domain(d, examples, cfg, acc, 0, path / "metrics.jsonl", {"method": "crma"})
    return cm


def main() -> None:
    from crma.routing.index import CentroidSettings
    from crma.settings import add_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2, help="torch threads")
    sub = parser.add_subparsers(dest="mode", required=True)
    acc = sub.add_parser("accuracy", parents=[common], help="top-1 on the evaluation sets")
    add_arguments(acc, CentroidSettings)
    acc.add_argument(
        "--thresholds",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.0],
        help="confidence thresholds to report (comma-separated; below one: fallback)",
    )
    acc.add_argument("--out", default="results/routing/router-eval", help="output path stem")
    over = sub.add_parser("overhead", parents=[common], help="generation time, routed vs given")
    over.add_argument("--pairs", type=int, default=3, help="A/B pairs (prompts cycle)")
    over.add_argument("--domains", default="medical,code", help="corpus domains")
    over.add_argument("--new-tokens", type=int, default=64, help="tokens per generation")
    over.add_argument("--steps", type=int, default=1, help="training steps per domain")
    over.add_argument("--examples", type=int, default=16, help="training texts per domain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "accuracy":
        accuracy(args)
    else:
        overhead(args)


def evaluation_sets(tokenizer, domain: str, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids of the evaluation prompts of one corpus domain, per set, as routers see them."""
    from crma.data import corpus_file, load_records, tokenize_records
    from crma.eval.qa import prompt_and_options, read_items, spread

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True)["input_ids"]  # as Router.route_texts

    holdout = load_records(corpus_file(domain, "holdout"))[:100]
    mmlu = spread(read_items(corpus_file(domain, "mmlu")), 300)
    return {
        "holdout": [e["input_ids"] for e in tokenize_records(holdout, tokenizer, max_length)],
        "probes": [ids(i["prompt"]) for i in read_items(corpus_file(domain, "probes"))],
        "mmlu": [ids(prompt_and_options(i)[0]) for i in mmlu],
        "mmlu_plain": [ids(i["question"]) for i in mmlu],
    }


def accuracy(args: argparse.Namespace) -> None:
    from crma.data import DOMAINS, corpus_file, load_records, tokenize_records
    from crma.engine import Engine, LoraSettings
    from crma.fileio import write_json, write_text
    from crma.model import EMBEDDED, load_base
    from crma.routing.index import CentroidRouter, CentroidSettings
    from crma.routing.router import DEFAULT_TEMPERATURE, decide
    from crma.settings import from_args

    settings = from_args(CentroidSettings, args)
    model, tokenizer = load_base(EMBEDDED)
    engine = Engine(model, tokenizer, LoraSettings(), None)
    router = CentroidRouter(settings)
    for d in DOMAINS:
        records = load_records(corpus_file(d, "train"))
        router.add_examples(engine, d, tokenize_records(records, tokenizer, settings.max_length))
    with tempfile.TemporaryDirectory() as tmp:  # the file a stack would hold
        router.save(SimpleNamespace(path=Path(tmp), manifest={}))
        size = (Path(tmp) / "router.safetensors").stat().st_size
    temperature = DEFAULT_TEMPERATURE[router.head]
    by_threshold: dict[str, dict] = {str(t): {} for t in args.thresholds}
    for d in DOMAINS:
        for name, ids in evaluation_sets(tokenizer, d, settings.max_length).items():
            scores = router.scores(router.embed(engine, ids))
            for t in args.thresholds:
                hits = Counter(
                    r.domain or "none" for r in decide(scores, router.domains, temperature, t)
                )
                by_threshold[str(t)].setdefault(name, {})[d] = {
                    "n": len(ids),
                    "top1": hits[d] / len(ids),
                    "fallback": hits["none"] / len(ids),
                    "routed_to": dict(hits.most_common()),
                }
                print(f"{t} {name:<10} {d:<9} top-1 {hits[d] / len(ids):.1%} {dict(hits)}")
    result = {
        "command": "benchmarks/routing.py " + shlex.join(sys.argv[1:]),
        "settings": dataclasses.asdict(settings),
        "stored_vectors": len(router.embeddings),
        "router_bytes": size,
        "thresholds": by_threshold,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    write_text(out.with_suffix(".md"), accuracy_markdown(result))
    print(f"-> {out.with_suffix('.md')}")


def accuracy_markdown(result: dict) -> str:
    lines = [
        "# Router top-1 on the evaluation sets",
        "",
        f"`{result['command']}`",
        "",
        f"Settings: {result['settings']}; {result['stored_vectors']} stored embeddings, "
        f"router.safetensors {result['router_bytes'] / 2**20:.1f} MiB.",
    ]
    for t, sets in result["thresholds"].items():
        domains = list(next(iter(sets.values())))
        lines += [
            "",
            f"## Fallback threshold {t}: top-1 % (fallback %)",
            "",
            "| set | " + " | ".join(domains) + " | worst |",
            "|---" * (len(domains) + 2) + "|",
        ]
        for name, per in sets.items():
            cells = " | ".join(
                f"{100 * per[d]['top1']:.1f}"
                + (f" ({100 * per[d]['fallback']:.1f})" if per[d]["fallback"] else "")
                for d in domains
            )
            worst = min(per[d]["top1"] for d in domains)
            lines.append(f"| {name} (n={per[domains[0]]['n']}) | {cells} | {100 * worst:.1f} |")
        lines += ["", "Where the misses went (routed to: count; `none` = fallback):", ""]
        for name, per in sets.items():
            for d in domains:
                wrong = {k: v for k, v in per[d]["routed_to"].items() if k != d}
                if wrong:
                    lines.append(
                        f"- {name}, {d}: " + ", ".join(f"{k} {v}" for k, v in wrong.items())
                    )
    return "\n".join(lines) + "\n"


def overhead(args: argparse.Namespace) -> None:
    from crma.data import corpus_file, load_records
    from crma.generate import GenerateSettings, StackModel

    domains = args.domains.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus_file(domains[0], "train")  # builds the corpus first if needed (once, ~1 min)
        print(f"corpus ready in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        cm = build_stack(Path(tmp) / "stack", domains, args.steps, args.examples)
        print(f"stack of {len(domains)} domains built in {time.perf_counter() - start:.0f} s")
        model = StackModel(cm)
        holdout = {
            d: [r["text"] for r in load_records(corpus_file(d, "holdout"))[:10]] for d in domains
        }
        for d, texts in holdout.items():
            routes = model.route(texts)
            print(
                f"centroid top-1 on {len(texts)} {d} holdout texts: "
                f"{sum(r.domain == d for r in routes) / len(texts):.0%}"
            )
        s = GenerateSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        prompts = [(d, holdout[d][0][:300]) for d in domains]
        warm = GenerateSettings(max_new_tokens=2)
        for d, p in prompts:  # warm-up: first calls pay for allocations and caches
            model.generate(p, d, warm)
            model.generate(p, "auto", warm)
        times: dict[str, list[float]] = {"given": [], "routed": []}
        for k in range(args.pairs):
            d, p = prompts[k % len(prompts)]
            arms = (("given", d), ("routed", "auto"))
            for arm, domain in arms if k % 2 == 0 else arms[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                answer = model.generate(p, domain, s)
                times[arm].append(time.perf_counter() - t0)
                assert answer.new_tokens == args.new_tokens, answer.new_tokens
    given, routed = statistics.median(times["given"]), statistics.median(times["routed"])
    print(
        f"{args.new_tokens}-token generation, median of {len(times['given'])} per arm, "
        f"{args.threads} threads:"
    )
    print(f"  domain given : {given:.3f} s")
    print(f"  routed (auto): {routed:.3f} s")
    print(
        f"  ratio routed/given: {routed / given:.3f} (routing adds {100 * (routed / given - 1):+.1f}%)"
    )


if __name__ == "__main__":
    main()
