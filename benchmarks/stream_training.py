"""The with-training comparison of the streaming benchmark (benchmarks/stream.py
--with-training N): each of N evaluation switching streams goes through `crma stream` (the
Python API, StreamLearner) twice, once driven by the detector and once by the true boundaries and
names (the oracle), with the same training settings; then each domain's holdout loss under the
adapter that the run sent that domain's documents to (the one it trained for them).

Stacks and logs are kept under --training-dir: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def train_config(args):
    """configs/paper.yaml's training settings, with --train-steps steps per domain."""
    from crma.train import TrainConfig

    return TrainConfig(
        lr=3e-3, batch_size=8, max_steps=args.train_steps, max_length=64, checkpoint_every=8
    )


def write_stream_file(path: Path, stream: dict, texts: dict[str, list[str]]) -> Path:
    """The stream's documents, in order, as JSON lines (what `crma stream --input` reads)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": texts[d][i]}) for d, i in stream["docs"]]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    return path


def run_stream(stack: Path, path: Path, detector, train_cfg, truth: list[dict] | None) -> dict:
    """One `crma stream` of `path` into a new stack (resumed if it exists); its summary."""
    from accelerate import Accelerator

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data.formats import load_records
    from crma.engine import LoraSettings
    from crma.model import EMBEDDED, base_model_id, load_base
    from crma.stream.learner import StreamLearner, StreamSettings

    spec = StackSpec("crma", {}, LoraSettings(), CRMAConfig())
    cm = ContinualModel.open_or_create(
        stack, lambda: load_base(EMBEDDED), base_model_id(EMBEDDED), spec
    )
    acc = Accelerator(mixed_precision="no")
    cm.tidy(acc)
    learner = StreamLearner(cm, path, StreamSettings(), detector, train_cfg, acc, truth=truth)
    done = learner.run(load_records(path))
    return {"cm": cm, "done": done}


def adapter_per_domain(stack: Path, truth: list[dict], trained: list[str]) -> dict[str, str | None]:
    """True domain -> the trained adapter the run decided most of its documents for."""
    from crma.stream.learner import StreamLog

    decided = {e["index"]: e["domain"] for e in StreamLog(stack).read() if e["event"] == "decision"}
    out = {}
    for domain in dict.fromkeys(s["domain"] for s in truth):
        votes = Counter(
            decided[i]
            for s in truth
            if s["domain"] == domain
            for i in range(s["start"], s["end"])
            if decided[i] in trained
        )
        out[domain] = votes.most_common(1)[0][0] if votes else None
    return out


def holdout_losses(cm, adapters: dict[str, str | None], holdout: dict[str, list]) -> dict:
    """Each true domain's holdout loss with its adapter (the base's when it has none)."""
    from crma.eval.loss import mean_token_loss

    return {
        domain: mean_token_loss(
            cm.engine, holdout[domain], cm.method.eval_adapters(a) if a else None, batch_size=20
        )
        for domain, a in adapters.items()
    }


def with_training(streams: list[dict], detector, args) -> dict:
    """Holdout loss per domain after the detector-driven and the oracle run of each stream."""
    import torch
    from stream import spare_pools

    from crma.data import corpus_file, load_records, tokenize_records
    from crma.model import load_base

    torch.set_num_threads(1)
    texts = spare_pools(args.per_domain)["evaluation"]
    tokenizer = load_base()[1]
    holdout = {
        d: tokenize_records(
            load_records(corpus_file(d, "holdout"))[: args.holdout_docs], tokenizer, 64
        )
        for d in texts
    }
    train_cfg = train_config(args)
    out = {"train_steps": args.train_steps, "holdout_docs": args.holdout_docs, "streams": []}
    for s in streams:
        path = write_stream_file(args.training_dir / f"stream-{s['seed']}.jsonl", s, texts)
        row = {"seed": s["seed"]}
        for run, truth in (("crma", None), ("oracle", s["truth"])):
            stack = args.training_dir / f"{s['seed']}-{run}"
            result = run_stream(stack, path, detector, train_cfg, truth)
            trained = result["done"]["trained"]
            adapters = adapter_per_domain(stack, s["truth"], trained)
            row[run] = {
                "trained": trained,
                "adapters": adapters,
                "loss": holdout_losses(result["cm"], adapters, holdout),
                "seconds": round(result["done"]["seconds"]),  # of the run that finished it
            }
            print(f"  stream {s['seed']} {run}: {row[run]['loss']}")
        row["diff_pct"] = {
            d: 100 * (row["crma"]["loss"][d] / row["oracle"]["loss"][d] - 1) for d in holdout
        }
        out["streams"].append(row)
    return out
