"""Where a `crma serve` token's time goes: the server's prefill, decode step and routing on a
stack, beside a plain Hugging Face forward (the same base, DynamicCache, no PEFT, no CRMA).
Routing: the main centroid router as the server runs it, as the engine runs it (toggling the
PEFT adapters off and on, as the server did before), and the stack's serving router (`fast`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_profile.py --stack STACK

Prints CPU milliseconds per call (median of --repeats; CPU time, as the machine may be shared) and, with --profile, the top operators of
torch.profiler for the server's decode step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        runs.append(time.process_time() - start)
    return 1000 * statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stack", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16, help="rows of the batched decode step")
    parser.add_argument("--context", type=int, default=100, help="tokens already in the cache")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="torch.profiler of a decode step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve import prompts

    from crma.generate import BASE, load_stack
    from crma.model import load_base
    from crma.routing.router import Router, RouteSettings
    from crma.serve.config import ServeSettings
    from crma.serve.prefill import groups, prefill
    from crma.serve.snapshot import Snapshot

    snap = Snapshot(load_stack(args.stack), ServeSettings())
    snap.warm_up()
    plain = load_base("embedded")[0].eval()
    pairs = prompts(snap.domains, 4, 200)
    texts = [p for _, p in pairs]
    ids = [snap.model.encode(p) for p in texts]
    print(f"prompt tokens: {[len(i) for i in ids[:8]]}")
    config = snap.engine.base.config
    B, T = args.batch, args.context
    domains = [snap.adapters(d) for d, _ in pairs]
    cm = snap.model.cm
    routers = {"server": snap.model.router, "engine (PEFT toggling)": Router(cm)}
    if snap.model.router.centroid.serving is not None:
        routers["server, --router fast"] = Router(cm, RouteSettings(router="fast"))
        routers["server, --router fast"].frozen_base = snap.model.router.frozen_base

    def cache_of(batch: int, fill: int) -> DynamicCache:
        cache = DynamicCache(config=config)
        x = torch.randint(0, 1000, (batch, fill))
        with torch.no_grad():
            plain(input_ids=x, cache=cache, use_cache=True)
        return cache

    def server_step(batch: int, peft: bool = False):
        """The server's decode step; with `peft`, rows pick adapters through PEFT's own
        `adapter_names` argument instead (what the server did before)."""
        cache = cache_of(batch, T)
        x = torch.randint(0, 1000, (batch, 1))
        mask = torch.ones(batch, T + 1, dtype=torch.long)
        pos = torch.full((batch, 1), T)
        rows = [domains[i % len(domains)] for i in range(batch)]
        kwargs = {"attention_mask": mask, "position_ids": pos, "cache": cache, "use_cache": True}

        def step():
            if peft:
                names = [a or BASE for a in rows]
                snap.engine.model(input_ids=x, adapter_names=names, logits_to_keep=1, **kwargs)
            else:
                snap.logits(x, mask, pos, cache, rows)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., :T, :], layer.values[..., :T, :]

        return step

    def plain_step(batch: int):
        cache = cache_of(batch, T)
        x = torch.randint(0, 1000, (batch, 1))

        def step():
            plain(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., :T, :], layer.values[..., :T, :]

        return step

    def server_prefill(rows: int):
        """One by one, the whole prompt (what the server did before)."""

        def run():
            for k in range(rows):
                x = torch.tensor([ids[k]])
                pos = torch.arange(x.shape[1]).unsqueeze(0)
                cache = DynamicCache(config=config)
                snap.logits(x, None, pos, cache, [domains[k]])

        return run

    def server_batched_prefill(rows: int):
        """As the server prefills requests that join together: groups, the cached head."""

        def run():
            lengths = [len(i) for i in ids[:rows]]
            for group in groups(lengths, lambda i: snap.head.length(ids[i])):
                prefill(snap, snap.head, [ids[i] for i in group], [domains[i] for i in group])

        return run

    def plain_prefill(rows: int):
        def run():
            for k in range(rows):
                cache = DynamicCache(config=config)
                plain(input_ids=torch.tensor([ids[k]]), cache=cache, logits_to_keep=1)

        return run

    with torch.no_grad():
        results = {
            "decode step, 1 row: server": timed(server_step(1), args.repeats),
            "decode step, 1 row: PEFT adapter_names": timed(server_step(1, True), args.repeats),
            "decode step, 1 row: plain HF": timed(plain_step(1), args.repeats),
            f"decode step, {B} rows mixed: server": timed(server_step(B), args.repeats),
            f"decode step, {B} rows mixed: PEFT adapter_names": timed(
                server_step(B, True), args.repeats
            ),
            f"decode step, {B} rows: plain HF": timed(plain_step(B), args.repeats),
            "prefill 1 prompt: server": timed(server_prefill(1), args.repeats),
            "prefill 1 prompt: plain HF": timed(plain_prefill(1), args.repeats),
            f"prefill {B} prompts one by one: server": timed(server_prefill(B), 1),
            f"prefill {B} prompts together: server": timed(server_batched_prefill(B), 1),
            f"prefill {B} prompts one by one: plain HF": timed(plain_prefill(B), 1),
        }
        for name, router in routers.items():
            router.route_texts(texts[:1])  # fits the head
            results[f"route 1 prompt: {name}"] = timed(
                lambda r=router: r.route_texts(texts[:1]), args.repeats
            )
            results[f"route {B} prompts: {name}"] = timed(
                lambda r=router: r.route_texts(texts[:B]), args.repeats
            )
        for label, ms in results.items():
            print(f"{label:>50}: {ms:9.1f} ms", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            step = server_step(B)
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
