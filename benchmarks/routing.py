"""Routing overhead: time of a 64-token generation with vs without routing, in one process.

Builds a small crma stack in a temporary folder on the embedded model (a few training steps
per corpus domain: the weights do not matter for timing), then alternates the two arms on the
same prompts (A/B/A/B…, so machine noise hits both alike): `domain=<the right one>` (no
routing) and `domain="auto"` (the stored centroid router picks it). Both generate exactly
`--new-tokens` tokens greedily. Prints median seconds per arm and their ratio (target ≤ 1.05),
and the centroid router's top-1 on a few holdout texts per domain as a sanity check.

    nice -n 10 .venv/bin/python benchmarks/routing.py [--pairs 5] [--domains medical,legal,code]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_stack(path: Path, domains: list[str], steps: int, n_examples: int):
    from accelerate import Accelerator

    from crma.adapter import CRMAConfig
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs (prompts cycle)")
    parser.add_argument("--domains", default="medical,code", help="corpus domains")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--steps", type=int, default=1, help="training steps per domain")
    parser.add_argument("--examples", type=int, default=16, help="training texts per domain")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
