"""Serving benchmark: `crma serve` on the embedded model vs `transformers serve`, one run.

1. Builds (or reuses, `--stack`) a crma stack on the embedded model: a few training steps per
   corpus domain (the weights do not matter for speed; the router is real).
2. Starts `crma serve` and measures, at each level of concurrent streaming clients, completion
   tokens/s and p50/p95 time to first token and total latency, on holdout passages of mixed
   domains with `model: auto` (greedy, fixed max_tokens). Then the same at 16 clients with each
   prompt's own domain named (no routing: the routing overhead) and with `base`.
3. A burst of 200 concurrent requests, counting errors.
4. A fine-tuning job (a new corpus domain) while 4 clients keep asking: p95 latency during the
   job beside idle, and where `auto` routes the new domain's holdout passages once it commits.
5. Starts `transformers serve` (Hugging Face's OpenAI server, `--continuous-batching`) on the
   same base model (the dequantized embedded folder) and runs the same levels, same prompts.

Writes a Markdown report (and the raw numbers as JSON beside it).

    nice -n 10 .venv/bin/python benchmarks/serve.py --out results/benchmarks/serve.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench"
HEADERS = {"Authorization": f"Bearer {KEY}"}
NEW_DOMAIN = "financial"


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    total: float = 0.0
    tokens: int = 0
    model: str = ""
    error: str = ""


# -- one streamed request ---------------------------------------------------------------------
async def ask(client: httpx2.AsyncClient, url: str, model: str, prompt: str, max_tokens: int):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, chunks, usage, answered = time.perf_counter(), None, 0, None, ""
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, error=str(event["error"])[:200])
                answered = event.get("model", answered)
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        ttft = ttft or time.perf_counter() - start
    except httpx2.HTTPError as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    total = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else chunks  # the peer sends no usage
    return Result(True, ttft or total, total, tokens, answered)


async def load(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int):
    """`clients` concurrent clients work through `jobs` (model, prompt); results and wall s."""
    queue = list(reversed(jobs))
    results: list[Result] = []
    limits = httpx2.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx2.AsyncClient(timeout=900, headers=HEADERS, limits=limits) as client:

        async def worker():
            while queue:
                model, prompt = queue.pop()
                results.append(await ask(client, url, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - start


def summarize(results: list[Result], wall: float) -> dict:
    good = [r for r in results if r.ok]
    ttft, total = sorted(r.ttft for r in good), sorted(r.total for r in good)
    return {
        "requests": len(results),
        "errors": len(results) - len(good),
        "tokens": sum(r.tokens for r in good),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(r.tokens for r in good) / wall, 2),
        "ttft_p50": round(_pct(ttft, 50), 3),
        "ttft_p95": round(_pct(ttft, 95), 3),
        "total_p50": round(_pct(total, 50), 3),
        "total_p95": round(_pct(total, 95), 3),
        "first_errors": [r.error for r in results if not r.ok][:3],
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


# -- servers ---------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}  # the peer, offline
    # One thread per server: on a shared CPU, OpenMP's spinning threads cost several times.
    offline["OMP_NUM_THREADS"] = "1"
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TOKENIZERS_PARALLELISM": "false",
        **offline,
    }


@contextmanager
def process(cmd: list[str], port: int, log: Path, ready: str):
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 600
            while time.monotonic() < end:
                if proc.poll() is not None:
                    raise SystemExit(f"{cmd[0:3]} exited ({proc.returncode}); see {log}")
                try:
                    if (
                        httpx2.get(f"http://127.0.0.1:{port}{ready}", headers=HEADERS).status_code
                        == 200
                    ):
                        break
                except httpx2.HTTPError:
                    pass
                time.sleep(1)
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the parts -----------------------------------------------------------------------------------
def prompts(domains: list[str], per_domain: int, chars: int) -> list[tuple[str, str]]:
    """(domain, prompt) pairs, domains interleaved: holdout passages cut to `chars`."""
    from crma.data import corpus_file, load_records

    by_domain = {
        d: [r["text"][:chars] for r in load_records(corpus_file(d, "holdout"))[:per_domain]]
        for d in domains
    }
    return [(d, by_domain[d][i]) for i in range(per_domain) for d in domains]


def run_levels(url, pairs, levels, args, model=None, rounds=None) -> dict:
    """Each level: `rounds` requests per client (at least --min-requests), prompts cycling."""
    out = {}
    for clients in levels:
        n = max(args.min_requests, (rounds or args.rounds) * clients)
        jobs = [(model or "auto", pairs[i % len(pairs)][1]) for i in range(n)]
        out[clients] = summarize(*asyncio.run(load(url, jobs, clients, args.max_tokens)))
        print(f"  {clients:>3} clients: {out[clients]}", flush=True)
    return out


def routing_overhead(url: str, pid: int, pairs, clients: int, max_tokens: int, repeats: int):
    """auto vs each prompt's own domain named, alternated so machine noise hits both alike;
    each run also records the server's CPU seconds (work done, which others' load on a shared
    machine changes far less than it changes latency)."""
    arms: dict[str, list[dict]] = {"auto": [], "named": []}
    n = clients
    for _ in range(repeats):
        for arm in arms:
            jobs = [("auto" if arm == "auto" else d, p) for d, p in (pairs * 4)[:n]]
            before = cpu_seconds(pid)
            run = summarize(*asyncio.run(load(url, jobs, clients, max_tokens)))
            arms[arm].append(run | {"server_cpu_s": round(cpu_seconds(pid) - before, 2)})
    med = {a: statistics.median(s["total_p50"] for s in runs) for a, runs in arms.items()}
    cpu = {a: statistics.median(s["server_cpu_s"] for s in runs) for a, runs in arms.items()}
    paired = statistics.median(
        a["total_p50"] / b["total_p50"] for a, b in zip(arms["auto"], arms["named"])
    )
    return {
        "runs": arms,
        "auto_p50": med["auto"],
        "named_p50": med["named"],
        "paired_ratio": round(paired, 4),
        "auto_cpu_s": cpu["auto"],
        "named_cpu_s": cpu["named"],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(url: str, pairs, n: int, max_tokens: int) -> dict:
    jobs = [("auto", pairs[i % len(pairs)][1]) for i in range(n)]
    return summarize(*asyncio.run(load(url, jobs, n, max_tokens)))


def fine_tune_while_serving(url: str, pairs, args) -> dict:
    """A job adds NEW_DOMAIN while 4 clients keep asking; then route its holdout passages."""
    from crma.data import corpus_file, load_records

    rows = load_records(corpus_file(NEW_DOMAIN, "train"))[: args.job_rows]
    data = "".join(json.dumps({"text": r["text"]}) + "\n" for r in rows).encode()
    http = httpx2.Client(base_url=url, headers=HEADERS, timeout=600)
    upload = http.post(
        "/v1/files", files={"file": ("fin.jsonl", data)}, data={"purpose": "fine-tune"}
    ).json()
    job = http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "auto",
            "training_file": upload["id"],
            "suffix": NEW_DOMAIN,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "seed": 0,
        },
    ).json()
    start = time.perf_counter()

    async def during() -> list[Result]:
        results: list[Result] = []
        limits = httpx2.Limits(max_connections=16)
        async with httpx2.AsyncClient(timeout=900, headers=HEADERS, limits=limits) as client:

            async def worker(k: int):
                i = k
                while http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] not in (
                    "succeeded",
                    "failed",
                    "cancelled",
                ):
                    results.append(
                        await ask(client, url, "auto", pairs[i % len(pairs)][1], args.max_tokens)
                    )
                    i += 4

            await asyncio.gather(*(worker(k) for k in range(4)))
        return results

    results = asyncio.run(during())
    job_s = time.perf_counter() - start
    final = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    holdout = [
        r["text"][: args.prompt_chars] for r in load_records(corpus_file(NEW_DOMAIN, "holdout"))
    ]
    routed = [
        http.post(
            "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": p}],
                "max_tokens": 1,
                "temperature": 0,
            },
        ).json()["model"]
        for p in holdout[: args.route_checks]
    ]
    return {
        "status": final["status"],
        "error": final["error"],
        "job_s": round(job_s, 1),
        "during": summarize(results, job_s),
        "routed_to_new": sum(m == NEW_DOMAIN for m in routed),
        "routed_checked": len(routed),
        "routed": routed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results/benchmarks/serve.md")
    parser.add_argument("--stack", type=Path, help="stack to serve (built there if missing)")
    parser.add_argument("--domains", default="medical,legal,code,science")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent clients")
    parser.add_argument("--peer-levels", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=6, help="requests per level, at least")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-chars", type=int, default=200)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--burst-tokens", type=int, default=8)
    parser.add_argument("--overhead-repeats", type=int, default=2)
    parser.add_argument("--job-rows", type=int, default=32)
    parser.add_argument("--route-checks", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=4, help="steps per built domain")
    parser.add_argument(
        "--router",
        default="centroid",
        choices=["centroid", "fast"],
        help="the router `auto` uses (crma serve --router): centroid (the main one) or fast "
        "(the stack's serving router)",
    )
    parser.add_argument("--skip", default="", help="comma list of: peer, job, burst, overhead")
    parser.add_argument("--render", type=Path, help="only rewrite --out from this report JSON")
    args = parser.parse_args()
    if args.render:
        args.out.write_text(render(json.loads(args.render.read_text())))
        return
    skip = set(filter(None, args.skip.split(",")))
    domains = args.domains.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="crma-serve-bench-"))
    stack = args.stack or work / "stack"
    if not (stack / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from routing import build_stack

        print(f"building {stack} ({args.train_steps} steps per domain)", flush=True)
        build_stack(stack, domains, args.train_steps, 16)
    live = work / "live"  # the job grows a copy; the built stack stays reusable
    shutil.copytree(stack, live, ignore=shutil.ignore_patterns("serve", "checkpoint"))
    pairs = prompts(domains, 8, args.prompt_chars)
    report: dict = {
        "command": " ".join(["benchmarks/serve.py", *sys.argv[1:]]),
        "settings": vars(args) | {"out": str(args.out), "stack": str(stack)},
        "stack_steps": [
            d["steps"] for d in json.loads((stack / "manifest.json").read_text())["domains"]
        ],
        "load": [os.getloadavg()[0]],  # 1-minute load average before (and after) the run
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a crash later keeps what was measured
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    port = free_port()
    serve = [sys.executable, "-m", "crma", "serve", str(live), "--port", str(port)]
    serve += ["--api-key", KEY, "--train-max-length", "64", "--router", args.router]
    print("crma serve", flush=True)
    with process(serve, port, work / "crma.log", "/health") as (url, pid):
        asyncio.run(load(url, [("auto", pairs[0][1])], 1, 2))  # warm-up
        report["crma"] = run_levels(url, pairs, levels, args)
        save()
        if "overhead" not in skip:
            report["overhead"] = routing_overhead(
                url, pid, pairs, 16, args.max_tokens, args.overhead_repeats
            )
            print(
                f"  routing: {report['overhead']['auto_p50']} vs {report['overhead']['named_p50']}"
            )
            report["crma_base16"] = run_levels(url, pairs, [16], args, "base")
            save()
        if "burst" not in skip:
            report["burst"] = burst(url, pairs, args.burst, args.burst_tokens)
            print(f"  burst: {report['burst']}", flush=True)
            save()
        if "job" not in skip:
            report["idle4"] = run_levels(url, pairs, [4], args, rounds=4)[4]
            report["job"] = fine_tune_while_serving(url, pairs, args)
            print(f"  job: {report['job']}", flush=True)
            save()
    if "peer" not in skip:
        from crma.model import _embedded_cache

        folder = str(_embedded_cache())
        port = free_port()
        peer = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder]
        peer += ["--continuous-batching", "--port", str(port), "--host", "127.0.0.1"]
        peer += ["--device", "cpu", "--dtype", "float32"]
        print("transformers serve", flush=True)
        with process(peer, port, work / "peer.log", "/v1/models") as (url, _pid):
            asyncio.run(load(url, [(folder, pairs[0][1])], 1, 2))
            peer_levels = [int(x) for x in args.peer_levels.split(",")]
            report["peer"] = run_levels(url, pairs, peer_levels, args, folder)
            report["peer_cmd"] = " ".join(peer[1:]).replace(folder, "<embedded HF folder>")
    report["load"] = [report["load"][0], os.getloadavg()[0]]
    save()
    args.out.write_text(render(report))
    print(f"wrote {args.out}")


def machine_load(report: dict) -> str:
    """The load the run met (older reports, without it, ran beside other jobs)."""
    if "load" not in report:
        return "shared with other jobs"
    before, after = report["load"]
    return f"(1-minute load average {before:.1f} before the run, {after:.1f} after)"


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Serving benchmark",
        "",
        f"`{report['command']}` on {platform.platform()}, "
        f"{os.cpu_count()} CPUs {machine_load(report)}, one OpenMP thread per server, "
        "embedded model (SmolLM2-135M-Instruct, float32), stack of "
        f"{s['domains']} ({report['stack_steps']} training steps each), greedy, max_tokens "
        f"{s['max_tokens']}, prompts: holdout passages cut to {s['prompt_chars']} characters, "
        f"domains interleaved, chat template, streamed. Each level: max({s['min_requests']}, "
        f"{s['rounds']} × clients) requests. `auto` routed by crma serve --router "
        f"{s.get('router', 'centroid')}.",
        "",
        "| server | model | clients | requests | errors | tokens/s | TTFT p50 | TTFT p95 | total p50 | total p95 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("crma serve", "auto", report["crma"])]
    if "crma_base16" in report:
        rows.append(("crma serve", "base", report["crma_base16"]))
    if "peer" in report:
        rows.append(("transformers serve --continuous-batching", "base", report["peer"]))
    for server, model, levels in rows:
        for clients, r in levels.items():
            lines.append(
                f"| {server} | {model} | {clients} | {r['requests']} | {r['errors']} | "
                f"{r['tokens_per_s']} | {r['ttft_p50']} | {r['ttft_p95']} | {r['total_p50']} | "
                f"{r['total_p95']} |"
            )
    lines += ["", "Times in seconds.", ""]
    crma = report["crma"]
    lines += _ratios(report, crma)
    return "\n".join(lines) + "\n"


def _ratios(report: dict, crma: dict) -> list[str]:
    out = []
    one = crma.get(1) or crma.get("1")
    sixteen = crma.get(16) or crma.get("16")
    if one and sixteen:
        out.append(
            f"- 16 clients vs 1: {sixteen['tokens_per_s'] / one['tokens_per_s']:.2f}× crma's "
            "own throughput (target ≥ 4×)."
        )
    peer = report.get("peer", {})
    peer16 = peer.get(16) or peer.get("16")
    if sixteen and peer16:
        out.append(
            f"- 16 clients, crma (auto, with adapters) vs transformers serve (base): "
            f"{sixteen['tokens_per_s'] / peer16['tokens_per_s']:.2f}× (target ≥ 1.0×)."
        )
    if "overhead" in report:
        o = report["overhead"]
        out.append(
            f"- Routing: 16 clients, median of p50 total latency, auto {o['auto_p50']:.3f} s vs "
            f"named domain {o['named_p50']:.3f} s: "
            f"{100 * (o['auto_p50'] / o['named_p50'] - 1):+.1f}% "
            "(target ≤ +5%)."
        )
        if "paired_ratio" in o:
            out.append(
                f"- Routing, paired: median over the {len(o['runs']['auto'])} repeats of auto's "
                f"p50 total latency over the named domain's just after: "
                f"{100 * (o['paired_ratio'] - 1):+.1f}%. Server CPU time per 16 requests, "
                f"median: auto {o['auto_cpu_s']:.2f} s vs named domain {o['named_cpu_s']:.2f} s: "
                f"{100 * (o['auto_cpu_s'] / o['named_cpu_s'] - 1):+.1f}%."
            )
    if "burst" in report:
        b = report["burst"]
        out.append(
            f"- Burst of {b['requests']} concurrent requests: {b['errors']} errors, "
            f"{b['requests'] - b['errors']} answered, in {b['wall_s']} s."
        )
    if "job" in report:
        j, idle = report["job"], report["idle4"]
        out.append(
            f"- Fine-tuning job ({NEW_DOMAIN}, {report['settings']['job_rows']} rows, 1 epoch, "
            f"batch 4) while 4 clients ask: {j['status']} in {j['job_s']} s; total latency p95 "
            f"{j['during']['total_p95']} s during the job vs {idle['total_p95']} s idle "
            f"(p50 {j['during']['total_p50']} vs {idle['total_p50']}), "
            f"{j['during']['requests']} requests answered during it, {j['during']['errors']} "
            f"errors. Right after the commit, `auto` routed {j['routed_to_new']}/"
            f"{j['routed_checked']} of {NEW_DOMAIN}'s holdout passages to {NEW_DOMAIN}."
        )
    return out


if __name__ == "__main__":
    main()
