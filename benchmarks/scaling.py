"""CPU scaling: training tokens/s of one process vs two for the same global batch.

`crma train` (method crma) on a small random Llama (6 layers, hidden 384, the tests' 512-token
tokenizer) over real medical passages of the embedded corpus, global batch 8 × up to 128
tokens. Four arms, interleaved in rounds so that the machine's load hits them alike:
one process with one thread, one process with two threads, and two processes (torchrun,
gloo) with one thread each, data-parallel and with the base sharded (train.fsdp). tokens/s is the trainer's own figure (metrics.jsonl: tokens of
the whole global batch over training time, model loading excluded); the load average is
recorded around every measurement. Writes results/benchmarks/scaling.{json,md,png}.

    .venv/bin/python benchmarks/scaling.py [--rounds 3] [--steps 12] [--render]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "benchmarks"
ARMS = {  # name -> (processes, threads per process, train.fsdp)
    "1 process × 1 thread": (1, 1, False),
    "1 process × 2 threads": (1, 2, False),
    "2 processes × 1 thread": (2, 1, False),
    "2 processes × 1 thread, FSDP": (2, 1, True),
}


def small_model(folder: Path) -> None:
    """A random 6-layer Llama with the tests' tokenizer (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def domain_file(path: Path, n: int = 400) -> None:
    from crma.data import corpus_file

    lines = corpus_file("medical", "train").read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")


def measure(arm: str, model: Path, data: Path, steps: int, work: Path) -> dict:
    processes, threads, fsdp = ARMS[arm]
    stack = Path(tempfile.mkdtemp(dir=work))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        if processes == 2
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "crma",
        "train",
        str(stack / "s"),
        "--base",
        str(model),
        "--domain",
        f"medical={data}",
        *("--max-steps", str(steps), "--batch-size", "8", "--max-length", "128"),
        *("--checkpoint-every", str(steps), "--fsdp", str(fsdp).lower()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    lines = [json.loads(x) for x in (stack / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == steps and lines[-1]["world_size"] == processes
    assert lines[-1]["fsdp"] == fsdp
    return {
        "arm": arm,
        "tokens_per_s": lines[-1]["tokens_per_s"],
        "world_size": lines[-1]["world_size"],
        "fsdp": fsdp,
        "rank_examples": lines[-1]["rank_examples"],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def summary(results: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for arm in ARMS:
        values = [r["tokens_per_s"] for r in results if r["arm"] == arm]
        out[arm] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def write(results: list[dict], command: str) -> None:
    stats = summary(results)
    base = stats["1 process × 1 thread"]["median"]
    loads = [x for r in results for x in (r["load_before"], r["load_after"])]
    rows = [
        f"| {arm} | {s['median']:.0f} | {s['min']:.0f}–{s['max']:.0f} | {s['median'] / base:.2f} |"
        for arm, s in stats.items()
    ]
    (OUT / "scaling.md").write_text(
        "\n".join(
            [
                "# CPU scaling: one process vs two (same global batch)",
                "",
                f"`{command}` on {os.cpu_count()} cores shared with other work: load average "
                f"{min(loads):.1f}–{max(loads):.1f} during the runs (2 would be this run alone).",
                "`crma train`, method crma, small random Llama (6 × 384), global batch 8 × ≤128 "
                "tokens; --steps steps per measurement, --rounds rounds with the arms interleaved. "
                "tokens/s: the trainer's own figure over all processes (model load excluded).",
                "",
                "| arm | tokens/s (median) | range | vs 1 process × 1 thread |",
                "|---|---|---|---|",
                *rows,
                "",
                "Every measurement: results/benchmarks/scaling.json.",
                "",
            ]
        )
    )
    (OUT / "scaling.json").write_text(
        json.dumps({"command": command, "results": results, "summary": stats}, indent=2) + "\n"
    )
    plot(results)


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3))
    for i, arm in enumerate(ARMS):
        values = [r["tokens_per_s"] for r in results if r["arm"] == arm]
        ax.scatter([i] * len(values), values, color="C0")
        ax.hlines(statistics.median(values), i - 0.2, i + 0.2, color="C1")
    ax.set_xticks(range(len(ARMS)), list(ARMS), fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("crma train on CPU: same global batch (dots: rounds, line: median)", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--render", action="store_true", help="rewrite scaling.md/.png from scaling.json only"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((OUT / "scaling.json").read_text())
        write(saved["results"], saved["command"])
        return
    command = f".venv/bin/python benchmarks/scaling.py --rounds {args.rounds} --steps {args.steps}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small_model(work / "model")
        domain_file(work / "medical.jsonl")
        results = []
        for round_ in range(args.rounds):
            for arm in ARMS:
                results.append(
                    measure(arm, work / "model", work / "medical.jsonl", args.steps, work)
                )
                r = results[-1]
                print(
                    f"round {round_ + 1} {arm}: {r['tokens_per_s']:.0f} tokens/s, load {r['load_before']:.1f}",
                    flush=True,
                )
        write(results, command)
    print((OUT / "scaling.md").read_text())


if __name__ == "__main__":
    main()
