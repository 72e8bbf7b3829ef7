"""Streaming benchmark (issue 20): boundary detection on unlabelled streams of the embedded
corpus, next to baselines; writes results/stream/{results.json, report.md, plots/*.png}.

Every `spare` document of the corpus is assigned to a half by its group (the validation half
sets the detector's thresholds; the evaluation half builds the streams below), and embedded
once with the frozen embedded base at the router's layer (cached under CRMA_HOME/stream).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/stream.py [--per-domain 300]
"""

from __future__ import annotations

import argparse
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
