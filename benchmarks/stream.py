"""Streaming benchmark (issue 20): boundary detection on unlabelled streams of the embedded
corpus, next to baselines; writes results/stream/{results.json, report.md, plots/*.png}.

Every `spare` document of the corpus is assigned to a half by its group (the validation half
sets the detector's thresholds; the evaluation half builds the streams below), and embedded
once with the frozen embedded base at the router's layer (cached under CRMA_HOME/stream).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/stream.py [--per-domain 300]
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch

HALVES = ("validation", "evaluation")


def spare_half(domain: str, source: str) -> str:
    """Which half a spare document belongs to, by its group (a licence, a source file, an
    article), so near-identical passages of one group never straddle the halves."""
    from crma.data.corpus import salted

    group = re.sub(r"(\.py):.*|#\d+$", r"\1", source)
    return HALVES[int(salted(domain, "stream-half", group)[-1], 16) % 2]


def spare_pools(per_domain: int) -> dict[str, dict[str, list[str]]]:
    """{half: {domain: texts}}, the first `per_domain` of each half in the corpus's order."""
    from crma.data import DOMAINS, corpus_file, load_records

    pools: dict[str, dict[str, list[str]]] = {h: {} for h in HALVES}
    for domain in DOMAINS:
        rows = load_records(corpus_file(domain, "spare"))
        for half in HALVES:
            texts = [r["text"] for r in rows if spare_half(domain, r["source"]) == half]
            pools[half][domain] = texts[:per_domain]
    return pools


def cached_embeddings(per_domain: int) -> dict[str, dict[str, torch.Tensor]]:
    """{half: {domain: (N, d) embeddings}}, computed once and cached."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from crma.data.corpus import corpus_tag
    from crma.model import crma_home

    path = crma_home() / "stream" / f"spare-{corpus_tag()}-{per_domain}.safetensors"
    if path.is_file():
        flat = load_file(str(path))
    else:
        from crma.engine import Engine, LoraSettings
        from crma.model import load_base
        from crma.stream.embedding import embed_texts

        model, tokenizer = load_base()
        engine = Engine(model, tokenizer, LoraSettings(), None)
        flat = {}
        pools = spare_pools(per_domain)
        for half, domains in pools.items():
            for domain, texts in tqdm(domains.items(), desc=f"embed {half}", unit="domain"):
                flat[f"{half}/{domain}"] = embed_texts(engine, texts).float()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(path))
    out: dict[str, dict[str, torch.Tensor]] = {h: {} for h in HALVES}
    for key, value in flat.items():
        half, domain = key.split("/")
        out[half][domain] = value.double()
    return out


# -- streams ------------------------------------------------------------------------------------
def segment_plan(rng: random.Random, domains: list[str], lengths: tuple[int, int]):
    """Ten segments: every domain twice (new, then a revisit), never twice in a row."""
    while True:
        order = [d for d in domains for _ in range(2)]
        rng.shuffle(order)
        if all(a != b for a, b in zip(order, order[1:])):
            return [(d, rng.randint(*lengths)) for d in order]


def draw(rng: random.Random, pools: dict[str, int], domain_of: list[str]) -> list[tuple[str, int]]:
    """(domain, row in its pool) per position; without repeats until a pool runs out."""
    bags: dict[str, list[int]] = {}
    out = []
    for domain in domain_of:
        if not bags.get(domain):
            bags[domain] = rng.sample(range(pools[domain]), pools[domain])
        out.append((domain, bags[domain].pop()))
    return out


def make_stream(kind: str, seed: int, pools: dict[str, int], args) -> dict:
    """One seeded stream: `docs` [(domain, row)], `truth` segments (nominal for blended)."""
    rng = random.Random(f"{kind}:{seed}")
    domains = sorted(pools)
    if kind == "stationary":
        plan = [(rng.choice(domains), args.stationary_docs)]
    else:
        plan = segment_plan(rng, domains, (args.min_segment, args.max_segment))
    truth, domain_of, start = [], [], 0
    for domain, n in plan:
        truth.append({"start": start, "end": start + n, "domain": domain})
        domain_of += [domain] * n
        start += n
    if kind == "blended":
        half = args.blend // 2
        for prev, seg in zip(truth, truth[1:]):
            b = seg["start"]
            for i in range(b - half, b + half):
                share = (i - (b - half) + 0.5) / args.blend  # of the incoming domain
                domain_of[i] = seg["domain"] if rng.random() < share else prev["domain"]
    return {"kind": kind, "seed": seed, "docs": draw(rng, pools, domain_of), "truth": truth}


def make_streams(kind: str, seeds: range, pools: dict[str, int], args) -> list[dict]:
    return [make_stream(kind, seed, pools, args) for seed in seeds]


def stream_embeddings(stream: dict, emb: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([emb[d][i] for d, i in stream["docs"]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-domain", type=int, default=300, help="documents per half/domain")
    parser.add_argument("--embed-only", action="store_true", help="only fill the cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.monotonic()
    emb = cached_embeddings(args.per_domain)
    print({h: {d: tuple(e.shape) for d, e in v.items()} for h, v in emb.items()})
    print(f"embeddings ready in {time.monotonic() - start:.0f} s")
    if args.embed_only:
        return


if __name__ == "__main__":
    main()
