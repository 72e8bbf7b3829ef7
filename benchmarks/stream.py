"""Streaming benchmark: boundary detection on unlabelled streams of the embedded
corpus, next to baselines; writes results/stream/{results.json, report.md, plots/*.png}.

Every `spare` document of the corpus is assigned to a half by its group (the validation half
sets the detector's thresholds; the evaluation half builds the streams below), and embedded
once with the frozen embedded base at the router's layer (cached under CRMA_HOME/stream).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py --loss-only
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py

The first command caches the base model's loss of a few documents (the loss-spike baseline;
a full forward pass each), the second everything else; `--report-only` rewrites report.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from stream_baselines import (
    OFFLINE,
    every_n,
    fixed_segments,
    kernel_cpd,
    loss_spike,
    oracle,
    router_score,
)
from stream_report import write_report

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
    from crma.routing.index import CentroidSettings

    s = CentroidSettings()  # what a new stack's router embeds
    tag = f"{corpus_tag()}-{per_domain}-layer{s.layer}-{s.max_length}-skip{int(s.skip_first)}"
    path = crma_home() / "stream" / f"spare-{tag}.safetensors"
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


def cached_losses(per_domain: int, max_length: int) -> dict[str, torch.Tensor]:
    """{domain: (N,)}: the mean token loss under the frozen base (the loss-spike baseline's
    signal) of the first `per_domain` evaluation-half documents, over their first `max_length`
    tokens; cached. A full forward pass per document: on one CPU thread, only a subset."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from crma.data.corpus import corpus_tag
    from crma.model import crma_home

    path = crma_home() / "stream" / f"loss-{corpus_tag()}-{per_domain}-{max_length}.safetensors"
    if path.is_file():
        flat = load_file(str(path))
    else:
        from crma.engine import Engine, LoraSettings
        from crma.model import load_base
        from crma.routing.router import prompt_losses

        model, tokenizer = load_base()
        model.eval()
        engine = Engine(model, tokenizer, LoraSettings(), None)
        flat = {}
        pool = spare_pools(per_domain)["evaluation"]
        for domain, texts in tqdm(pool.items(), desc="loss", unit="domain"):
            ids = [tokenizer(t)["input_ids"][:max_length] for t in texts]
            flat[domain] = prompt_losses(engine, ids, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(path))
    return {domain: value.double() for domain, value in flat.items()}


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


# -- detectors: crma's and the baselines; each gives segments with `new` and `decided_at` ------
def crma_detector(x: torch.Tensor, settings) -> tuple[list[dict], dict[str, list[float]]]:
    """The crma detector (nothing known at the start); segments and per-document traces."""
    from crma.stream.detector import Detector

    det = Detector(settings)
    decisions = sorted(det.run(x), key=lambda d: d.index)
    trace = {
        "novelty": [d.novelty if d.novelty is not None else 0.0 for d in decisions],
        "change": [d.change for d in decisions],
    }
    return det.segments_dicts(), trace


def crma_method(settings):
    """stream -> the crma detector's segments."""
    return lambda s: crma_detector(s["x"], settings)[0]


# -- calibration on validation streams, evaluation --------------------------------------------
def scored(method, streams: list[dict], margin: int) -> dict:
    """Pooled metrics of `method(stream) -> segments` over `streams`."""
    from crma.stream.metrics import pool, score_stream

    return pool([score_stream(s["truth"], method(s), margin) for s in streams])


def calibrate(val: dict[str, list[dict]], args) -> dict:
    """Every tuned value, chosen on validation streams only.

    crma: among the confirmation thresholds whose false-alarm rate on the stationary validation
    streams is at most --fa-margin x --target-fa per 10k documents (a margin below the target),
    the one with the best F1 on the switching validation streams (ties: the larger); then the
    known/new threshold with the best new-vs-known accuracy (ties: more streams with exactly
    the right number of adapters, then the larger); then the known band with the most streams
    with exactly the right number of adapters among those whose mean delay stays within
    --max-delay (ties: the smaller). Baselines: the value with the best F1 on the validation
    switching streams (so none is handicapped by a value chosen for crma).
    """
    from crma.stream.detector import DetectorSettings

    switching, stationary = val["switching"], val["stationary"]
    log: dict[str, list] = {"confirm": [], "known_threshold": [], "known_band": []}
    allowed = args.fa_margin * args.target_fa
    best = (False, -1.0, 0.0)
    for c in args.confirms:
        settings = DetectorSettings(confirm=c, known_band=0.0)
        fa = scored(crma_method(settings), stationary, args.margin)["false_alarms_per_10k"]
        sw = scored(crma_method(settings), switching, args.margin)
        log["confirm"].append({"confirm": c, "fa": fa, "f1": sw["f1"], "switching": sw})
        print(f"  confirm {c}: {fa:.2f} FA/10k, F1 {sw['f1']:.3f}")
        best = max(best, (fa <= allowed, sw["f1"], c))
    chosen = best[2]
    best = (-1.0, -1, 0.0)
    for theta in args.known_thresholds:
        settings = DetectorSettings(confirm=chosen, known_threshold=theta, known_band=0.0)
        sw = scored(crma_method(settings), switching, args.margin)
        acc = sw["new_known_accuracy"] or 0.0
        log["known_threshold"].append(
            {"known_threshold": theta, "accuracy": acc, "f1": sw["f1"], "switching": sw}
        )
        print(f"  known threshold {theta}: new-vs-known {acc:.3f}, F1 {sw['f1']:.3f}")
        best = max(best, (acc, sw["adapters_exact"], theta))
    theta = best[2]
    best = (False, -1, 0.0)
    for band in args.known_bands:
        settings = DetectorSettings(confirm=chosen, known_threshold=theta, known_band=band)
        sw = scored(crma_method(settings), switching, args.margin)
        log["known_band"].append({"known_band": band, "f1": sw["f1"], "switching": sw})
        print(f"  known band {band}: {sw['adapters_exact']} exact, delay {sw['delay_mean']:.1f}")
        best = max(best, (sw["delay_mean"] <= args.max_delay, sw["adapters_exact"], -band))
    out = {"crma": {"confirm": chosen, "known_threshold": theta, "known_band": -best[2]}}
    out["log"] = log

    def best_f1(name, values, method):
        f1s = [scored(lambda s, v=v: method(s, v), switching, args.margin)["f1"] for v in values]
        out[name] = values[int(np.argmax(f1s))]
        log[name] = list(zip(values, f1s))
        print(f"  {name}: {out[name]} (validation F1 {max(f1s):.3f})")

    best_f1("every_n", [30, 60, 90, 120], lambda s, v: every_n(len(s["x"]), v))
    best_f1(
        "router_score",
        [-0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.6],
        lambda s, v: router_score(s["x"], v),
    )
    best_f1("kernel_cpd", [1.0, 2.0, 4.0, 8.0, 16.0], lambda s, v: kernel_cpd(s["x"], v))
    if all("loss" in s for s in switching):
        best_f1(
            "loss_spike",
            [(w, k) for w in (5, 10) for k in (2.0, 3.0, 4.0, 6.0)],
            lambda s, v: loss_spike(s["loss"], *v),
        )
    return out


def methods(cal: dict) -> dict:
    """name -> stream -> detected segments."""
    from crma.stream.detector import DetectorSettings

    settings = DetectorSettings(**cal["crma"])
    out = {
        "crma": crma_method(settings),
        "oracle": lambda s: oracle(s["truth"]),
        "never": lambda s: fixed_segments(len(s["x"]), []),
        f"every {cal['every_n']}": lambda s: every_n(len(s["x"]), cal["every_n"]),
        "router score": lambda s: router_score(s["x"], cal["router_score"]),
        f"kernel CPD {OFFLINE}": lambda s: kernel_cpd(s["x"], cal["kernel_cpd"]),
    }
    if "loss_spike" in cal:
        out["loss spike"] = lambda s: loss_spike(s["loss"], *cal["loss_spike"])
    return out


# -- report ----------------------------------------------------------------------------------------
def plot_stream(stream: dict, settings, path: Path, title: str) -> None:
    """Document index on x: the change score and the per-document novelty, true boundaries
    (solid) and detected ones (dashed), the alarm threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs, trace = crma_detector(stream["x"], settings)
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.plot(trace["novelty"], lw=0.6, color="0.6", label="novelty (one document)")
    ax.plot(trace["change"], lw=1.0, color="C0", label="change score (window)")
    ax.axhline(settings.threshold, color="C3", lw=0.8, ls=":", label="threshold")
    for i, seg in enumerate(stream["truth"][1:]):
        ax.axvline(seg["start"], color="k", lw=1.0, label="true boundary" if i == 0 else None)
    for i, seg in enumerate(segs[1:]):
        ax.axvline(seg["start"], color="C1", lw=1.0, ls="--", label="detected" if i == 0 else None)
    for seg in stream["truth"]:
        ax.text((seg["start"] + seg["end"]) / 2, ax.get_ylim()[1], seg["domain"][:4],
                ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xlabel("document")
    ax.set_title(title, fontsize=9, pad=14)
    ax.legend(fontsize=7, loc="upper right", ncol=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-domain", type=int, default=300, help="documents per half/domain")
    parser.add_argument("--embed-only", action="store_true", help="only fill the cache")
    parser.add_argument(
        "--loss-only", action="store_true", help="only fill the loss cache (loss-spike baseline)"
    )
    parser.add_argument("--loss-docs", type=int, default=40, help="evaluation docs per domain")
    parser.add_argument("--loss-tokens", type=int, default=32, help="tokens per document")
    parser.add_argument("--streams", type=int, default=20, help="streams per kind")
    parser.add_argument("--min-segment", type=int, default=30)
    parser.add_argument("--max-segment", type=int, default=150)
    parser.add_argument("--blend", type=int, default=20, help="documents two domains mix over")
    parser.add_argument("--stationary-docs", type=int, default=500)
    parser.add_argument("--margin", type=int, default=10)
    parser.add_argument("--blend-margin", type=int, default=20)
    parser.add_argument("--target-fa", type=float, default=1.0, help="false alarms per 10k")
    parser.add_argument(
        "--fa-margin", type=float, default=0.5, help="calibrate to this fraction of --target-fa"
    )
    parser.add_argument("--val-streams", type=int, default=200, help="validation streams per kind")
    parser.add_argument("--confirms", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    parser.add_argument("--known-thresholds", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.3])
    parser.add_argument("--known-bands", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--max-delay", type=float, default=10.0, help="mean delay a known band may cost at most"
    )
    parser.add_argument(
        "--with-training",
        type=int,
        default=0,
        metavar="N",
        help="also run `crma stream` with the detector and with the true boundaries on the "
        "first N evaluation switching streams and compare each domain's holdout loss",
    )
    parser.add_argument("--train-steps", type=int, default=16, help="steps per new domain")
    parser.add_argument("--holdout-docs", type=int, default=100, help="holdout docs per domain")
    parser.add_argument(
        "--training-dir", type=Path, default=None, help="stacks of --with-training (resumable)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/stream"))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md from results.json"
    )
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / "results.json").read_text()), args)
        return
    torch.set_num_threads(1)
    start = time.monotonic()
    if args.loss_only:
        cached_losses(args.loss_docs, args.loss_tokens)
        return
    emb = cached_embeddings(args.per_domain)
    if args.embed_only:
        return
    if args.with_training:
        training_comparison(emb, args)
        return
    from crma.stream.detector import DetectorSettings

    def streams(kind: str, half: str, seeds: range) -> list[dict]:
        pools = {d: len(e) for d, e in emb[half].items()}
        out = make_streams(kind, seeds, pools, args)
        for s in out:
            s["x"] = stream_embeddings(s, emb[half])
        return out

    n = args.streams
    n_val = range(1000, 1000 + args.val_streams)
    val = {k: streams(k, "validation", n_val) for k in ("switching", "stationary")}
    print("calibrating on validation streams")
    cal = calibrate(val, args)
    evaluation = {
        k: streams(k, "evaluation", range(n)) for k in ("switching", "blended", "stationary")
    }
    margins = {"switching": args.margin, "blended": args.blend_margin, "stationary": args.margin}
    results: dict = {"calibration": cal, "tables": {}}
    for kind, ss in evaluation.items():
        results["tables"][kind] = {}
        for name, method in methods(cal).items():
            t0 = time.monotonic()
            results["tables"][kind][name] = scored(method, ss, margins[kind])
            print(f"  {kind:10s} {name:22s} F1 {results['tables'][kind][name]['f1']:.3f} "
                  f"({time.monotonic() - t0:.0f} s)")  # fmt: skip
    loss_table(results, emb, cal, args)
    settings = DetectorSettings(**cal["crma"])
    results["stationary_false_alarms"] = [
        f"{s['truth'][0]['domain']}@{seg['start']}"
        for s in evaluation["stationary"]
        for seg in crma_detector(s["x"], settings)[0][1:]
    ]
    for kind, ss in evaluation.items():
        plot_stream(ss[0], settings, args.out / "plots" / f"{kind}.png", f"{kind} stream, seed 0")
    results["settings"] = vars(args) | {"out": str(args.out)}
    results["seconds"] = round(time.monotonic() - start)
    write_report(results, args)


def training_comparison(emb: dict, args) -> None:
    """--with-training N: the detector chosen by the last full run (results.json) against the
    oracle, with training, on the first N evaluation switching streams; report rewritten."""
    from stream_training import with_training

    from crma.model import crma_home
    from crma.stream.detector import DetectorSettings

    results = json.loads((args.out / "results.json").read_text())
    pools = {d: len(e) for d, e in emb["evaluation"].items()}
    ss = make_streams("switching", range(args.with_training), pools, args)
    args.training_dir = args.training_dir or crma_home() / "stream" / "training"
    settings = DetectorSettings(**results["calibration"]["crma"])
    start = time.monotonic()
    results["with_training"] = with_training(ss, settings, args)
    results["with_training"]["seconds"] = round(time.monotonic() - start)
    shown = {"out": args.out, "with_training": args.with_training}
    write_report(results, argparse.Namespace(**(results["settings"] | shown)))


def loss_table(results: dict, emb: dict, cal: dict, args) -> None:
    """The loss-spike baseline next to crma on switching streams drawn from the documents
    whose base-model loss was computed (a subset: a full forward pass each)."""
    from crma.data.corpus import corpus_tag
    from crma.model import crma_home
    from crma.stream.detector import DetectorSettings

    name = f"loss-{corpus_tag()}-{args.loss_docs}-{args.loss_tokens}.safetensors"
    if not (crma_home() / "stream" / name).is_file():
        print("no loss cache: run with --loss-only first; loss-spike baseline skipped")
        return
    losses = cached_losses(args.loss_docs, args.loss_tokens)
    pools = {d: len(v) for d, v in losses.items()}
    ss = make_streams("switching", range(args.streams), pools, args)
    for s in ss:
        s["x"] = stream_embeddings(s, emb["evaluation"])
        s["loss"] = [float(losses[d][i]) for d, i in s["docs"]]
    values = [(w, k) for w in (5, 10) for k in (2.0, 3.0, 4.0, 6.0, 8.0)]
    f1s = [scored(lambda s, v=v: loss_spike(s["loss"], *v), ss, args.margin)["f1"] for v in values]
    best = values[int(np.argmax(f1s))]
    settings = DetectorSettings(**cal["crma"])
    results["loss_spike"] = {"window_k": best, "grid": list(zip(values, f1s))}
    results["tables"]["switching, loss subset"] = {
        "crma": scored(crma_method(settings), ss, args.margin),
        "oracle": scored(lambda s: oracle(s["truth"]), ss, args.margin),
        "loss spike": scored(lambda s: loss_spike(s["loss"], *best), ss, args.margin),
    }


if __name__ == "__main__":
    main()
