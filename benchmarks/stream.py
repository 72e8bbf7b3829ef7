"""Streaming benchmark (issue 20): boundary detection on unlabelled streams of the embedded
corpus, next to baselines; writes results/stream/{results.json, report.md, plots/*.png}.

Every `spare` document of the corpus is assigned to a half by its group (the validation half
sets the detector's thresholds; the evaluation half builds the streams below), and embedded
once with the frozen embedded base at the router's layer (cached under CRMA_HOME/stream).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/stream.py [--per-domain 300]
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


def oracle(truth: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for s in truth:
        out.append({**s, "new": s["domain"] not in seen, "decided_at": s["start"]})
        seen.add(s["domain"])
    return out


def fixed_segments(n: int, starts: list[int], decided: list[int] | None = None) -> list[dict]:
    """Every piece between `starts` is a new domain (no identification)."""
    edges = [0, *starts, n]
    decided = decided or [0, *starts]
    return [
        {"start": a, "end": b, "domain": f"new-{i + 1}", "new": True, "decided_at": d}
        for i, (a, b, d) in enumerate(zip(edges, edges[1:], decided))
    ]


def every_n(n: int, period: int) -> list[dict]:
    return fixed_segments(n, list(range(period, n, period)))


def loss_spike(losses: list[float], window: int, k: float) -> list[dict]:
    """Aljundi et al. (2019)-style: a new task when the mean loss of the last `window` documents
    leaves the current plateau (the documents since the last boundary, before the window) by
    more than `k` standard errors, either way (the frozen base's loss has no learning dip to
    wait for). Online; the boundary goes at the start of the window."""
    c1 = np.concatenate([[0.0], np.cumsum(losses)])
    c2 = np.concatenate([[0.0], np.cumsum(np.square(losses))])
    starts, decided, begin = [], [0], 0
    for t in range(len(losses)):
        w0 = t - window + 1  # the window is [w0, t]
        if w0 - begin < 2 * window:
            continue
        n = w0 - begin
        mean = (c1[w0] - c1[begin]) / n
        sd = max((c2[w0] - c2[begin] - n * mean**2) / (n - 1), 1e-12) ** 0.5
        if abs((c1[t + 1] - c1[w0]) / window - mean) > k * sd / window**0.5:
            starts.append(w0)
            decided.append(t)
            begin = w0
    return fixed_segments(len(losses), starts, decided)


def router_score(x: torch.Tensor, threshold: float) -> list[dict]:
    """The stored router's score alone: a document whose best prototype cosine (the centroid
    router's `prototype` head on the domains so far) is under `threshold` opens a new domain,
    else it goes to the best domain; a boundary wherever the domain changes."""
    from crma.routing.index import CentroidRouter

    router = CentroidRouter()
    out: list[dict] = []
    for t, doc in enumerate(x):
        if router.domains:
            scores = router.scores(doc[None])[0]
            k = int(scores.argmax())
            known = float(scores[k]) >= threshold
        if not router.domains or not known:
            name = f"new-{len(router.domains) + 1}"
            router.domains.append(name)
            stats = [doc.new_ones(1), doc[None], (doc * doc)[None]]
            if len(router.domains) == 1:
                router.count, router.sum, router.sumsq = stats
            else:
                router.count = torch.cat([router.count, stats[0]])
                router.sum = torch.cat([router.sum, stats[1]])
                router.sumsq = torch.cat([router.sumsq, stats[2]])
            new = True
        else:
            name, new = router.domains[k], False
            router.count[k] += 1
            router.sum[k] += doc
            router.sumsq[k] += doc * doc
        if not out or out[-1]["domain"] != name:
            if out:
                out[-1]["end"] = t
            out.append({"start": t, "end": -1, "domain": name, "new": new, "decided_at": t})
    out[-1]["end"] = len(x)
    return out


def kernel_cpd(x: torch.Tensor, penalty: float) -> list[dict]:
    """Offline kernel change-point detection (ruptures KernelCPD, RBF kernel) on the stream's
    standardised embeddings; it sees the whole stream, so its delay is not comparable."""
    import ruptures

    z = ((x - x.mean(0)) / (x.std(0) + 1e-6)).numpy()
    ends = ruptures.KernelCPD(kernel="rbf", min_size=5).fit(z).predict(pen=penalty)
    starts = ends[:-1]
    return fixed_segments(len(x), starts, [len(x) - 1] * len(ends))  # decided at the end


# -- calibration on validation streams, evaluation --------------------------------------------
def scored(method, streams: list[dict], margin: int) -> dict:
    """Pooled metrics of `method(stream) -> segments` over `streams`."""
    from crma.stream.metrics import pool, score_stream

    return pool([score_stream(s["truth"], method(s), margin) for s in streams])


def calibrate(val: dict[str, list[dict]], args) -> dict:
    """Every tuned value, chosen on validation streams only.

    crma: the lowest CUSUM threshold whose false-alarm rate on the stationary validation
    streams is at most --target-fa per 10k documents, then the known/new threshold with the
    best new-vs-known accuracy (ties: the larger). Baselines: the value with the best F1 on
    the validation switching streams (so none is handicapped by a value chosen for crma).
    """
    from crma.stream.detector import DetectorSettings

    switching, stationary = val["switching"], val["stationary"]
    log: dict[str, list] = {"threshold": [], "known_threshold": []}
    chosen = None
    for h in args.thresholds:
        settings = DetectorSettings(threshold=h)
        fa = scored(crma_method(settings), stationary, args.margin)
        sw = scored(crma_method(settings), switching, args.margin)
        log["threshold"].append({"threshold": h, "fa": fa["false_alarms_per_10k"], "f1": sw["f1"]})
        print(f"  threshold {h}: {fa['false_alarms_per_10k']:.2f} FA/10k, F1 {sw['f1']:.3f}")
        if chosen is None and fa["false_alarms_per_10k"] <= args.target_fa:
            chosen = h
    chosen = chosen if chosen is not None else args.thresholds[-1]
    best = (-1.0, None)
    for theta in args.known_thresholds:
        settings = DetectorSettings(threshold=chosen, known_threshold=theta)
        sw = scored(crma_method(settings), switching, args.margin)
        acc = sw["new_known_accuracy"] or 0.0
        log["known_threshold"].append({"known_threshold": theta, "accuracy": acc, "f1": sw["f1"]})
        print(f"  known threshold {theta}: new-vs-known {acc:.3f}, F1 {sw['f1']:.3f}")
        if acc >= best[0]:
            best = (acc, theta)
    out = {"crma": {"threshold": chosen, "known_threshold": best[1]}, "log": log}

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
COLUMNS = [
    ("precision", "P", "{:.3f}"),
    ("recall", "R", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("delay_mean", "delay mean", "{:.1f}"),
    ("delay_p90", "delay p90", "{:.1f}"),
    ("false_alarms_per_10k", "false alarms /10k", "{:.1f}"),
    ("new_known_accuracy", "new-vs-known", "{:.3f}"),
    ("adapters_exact", "adapters exact", "{}"),
    ("ari_mean", "ARI", "{:.3f}"),
]


OFFLINE = "(offline)"  # sees the whole stream: no delay to report


def table(rows: dict[str, dict]) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows.items():
        cells = [
            "–" if m[k] is None or (k.startswith("delay") and OFFLINE in name) else fmt.format(m[k])
            for k, _, fmt in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2, 1.5])
    parser.add_argument("--known-thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
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
    from crma.stream.detector import DetectorSettings

    def streams(kind: str, half: str, seeds: range) -> list[dict]:
        pools = {d: len(e) for d, e in emb[half].items()}
        out = make_streams(kind, seeds, pools, args)
        for s in out:
            s["x"] = stream_embeddings(s, emb[half])
        return out

    n = args.streams
    val = {k: streams(k, "validation", range(1000, 1000 + n)) for k in ("switching", "stationary")}
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


def write_report(results: dict, args) -> None:
    from crma.fileio import write_json, write_text

    write_json(args.out / "results.json", results)
    cal = results["calibration"]
    lines = [
        "# Streaming: domain-boundary detection (issue 20)",
        "",
        "Command: `PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py "
        "--loss-only && PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream.py` "
        f"({results['seconds']} s on one CPU thread, embeddings cached).",
        "",
        f"Embedded corpus, `spare` pools split in halves by group; up to {args.per_domain} "
        "documents per domain and half, embedded once (router layer, 128 tokens). "
        f"Thresholds from {args.streams} validation streams per kind (validation half); "
        f"the tables from {args.streams} evaluation streams per kind (evaluation half, other "
        "seeds). Nothing is known at the start of a stream, so each of the 5 domains should "
        "open one new domain (adapter) and be recognised on its revisit.",
        "",
        f"crma detector: threshold {cal['crma']['threshold']} (the lowest with at most "
        f"{args.target_fa} false alarms per 10k documents on the validation stationary "
        f"streams), known threshold {cal['crma']['known_threshold']}. Baselines: each tuned "
        "value is the best validation F1 (every N documents: "
        f"N = {cal['every_n']}; router score: {cal['router_score']}; kernel CPD penalty "
        f"{cal['kernel_cpd']}). Kernel CPD is offline (it sees the whole stream): a reference "
        "for where the boundaries are, with no delay, and it names every segment a new domain.",
        "",
    ]
    titles = {
        "switching": f"Switching streams: 10 segments of {args.min_segment}–{args.max_segment} "
        f"documents, margin {args.margin}",
        "blended": f"Blended streams: neighbours mix over {args.blend} documents, margin "
        f"{args.blend_margin}",
        "stationary": f"Stationary streams: one domain, {args.stationary_docs} documents "
        "(every detection is a false alarm)",
        "switching, loss subset": f"Loss-spike baseline: switching streams from the first "
        f"{args.loss_docs} evaluation documents per domain (documents repeat within a stream); "
        "its window and k are the best F1 on these same streams (an upper bound for it)",
    }
    sw, bl, st = (results["tables"][k]["crma"] for k in ("switching", "blended", "stationary"))
    checks = [
        ("F1 ≥ 0.95 at margin 10", sw["f1"] >= 0.95, f"{sw['f1']:.3f}"),
        ("precision ≥ 0.95", sw["precision"] >= 0.95, f"{sw['precision']:.3f}"),
        ("recall ≥ 0.95", sw["recall"] >= 0.95, f"{sw['recall']:.3f}"),
        ("mean delay ≤ 10", sw["delay_mean"] <= 10, f"{sw['delay_mean']:.1f}"),
        ("delay p90 ≤ 20", sw["delay_p90"] <= 20, f"{sw['delay_p90']:.1f}"),
        (
            "≤ 1 false alarm per 10k stationary documents",
            st["false_alarms_per_10k"] <= 1,
            f"{st['false_alarms_per_10k']:.1f} ({', '.join(results['stationary_false_alarms'])})",
        ),
        (
            "new-vs-known ≥ 0.95",
            sw["new_known_accuracy"] >= 0.95,
            f"{sw['new_known_accuracy']:.3f}",
        ),
        (
            "exactly 5 adapters in ≥ 18 of 20 streams",
            sw["adapters_exact"] >= 18,
            f"{sw['adapters_exact']} of {sw['streams']} (adapters per stream: {sw['adapters']})",
        ),
        ("ARI ≥ 0.90", sw["ari_mean"] >= 0.90, f"{sw['ari_mean']:.3f}"),
        ("blended F1 ≥ 0.85 at margin 20", bl["f1"] >= 0.85, f"{bl['f1']:.3f}"),
    ]
    lines += ["## Targets (crma detector, evaluation streams)", ""]
    lines += [f"- {'met' if ok else '**missed**'}: {what}: {value}" for what, ok, value in checks]
    lines += [
        "- **not done**: the with-training comparison (each domain's final holdout loss against "
        "the same stream trained with the true boundaries, on 3 streams): too expensive for the "
        "CPU time this run had.",
        "",
    ]
    for kind, rows in results["tables"].items():
        lines += [f"## {titles[kind]}", "", table(rows), ""]
        if kind in ("switching", "blended", "stationary"):
            lines += [f"![{kind}](plots/{kind}.png)", ""]
    write_text(args.out / "report.md", "\n".join(lines))
    print(f"wrote {args.out}/report.md")


if __name__ == "__main__":
    main()
