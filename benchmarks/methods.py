"""Cost of each continual-learning method: parameters, memory, speed and task id, in one process.

Every method gets a stack trained on domain 1 (`--steps` steps), so that its second-domain
machinery is live on domain 2 (EWC's penalty, the replay buffer, LwF's teacher, O-LoRA's
orthogonality loss, InfLoRA's subspace, OSF's merged subspace). Then, in `--rounds` rounds,
each visiting the methods in a rotated order (so machine noise and drift hit all alike), a
fresh copy of each method's domain-1 stack learns domain 2 with `--steps` steps, timed. All
methods share one base model (deep-copied per run), LoRA r=8 on PEFT's default targets, the
default CRMA backbone, each method's default options, seed 0 and fp32. With `--config`, the
conditions are a protocol config's method entries instead, each with its own options, LoRA
and backbone settings, named by its label (osf-qv's budget-matched OSF, replay at its tuned
ratio): the costs of exactly what that head-to-head runs. `naive` is always run: it is the
reference of the "+trainable", "step x" and "domain x" columns. What each column measures
exactly is printed under the table (`COLUMNS`).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/methods.py \\
        [--methods naive,crma,ewc | --config configs/baselines.yaml] [--rounds 3] [--steps 6] \\
        [--out results/benchmarks/methods]
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

COLUMNS = {
    "task id": "inference must be told (or route to) the domain: the method's `needs_task_id`",
    "trainable": "parameters the trainer optimises on domain 2 (the method's `trainable_groups`)",
    "+trainable": "trainable minus naive's (AdamW state and gradients grow 3x this)",
    "step ms": "median wall time of one domain-2 optimizer step (batch assembly, forward with "
    "the method's extra loss, backward, clipping, AdamW), from one step's start to the next; "
    "the first step (warm-up) and the last are left out and the per-step metrics logging and "
    "checkpoints are turned off; median over steps and rounds",
    "step x": "step ms / naive's step ms",
    "domain s": "median wall time of adding domain 2 (`ContinualModel.add_domain`): all steps, "
    "the method's begin/end-of-domain work, the start and end checkpoints, the router update "
    "and saving the stack",
    "domain x": "domain s / naive's domain s",
    "task work s": "median time inside the method's begin_task + end_task on domain 2 (LwF's "
    "teacher copy, EWC's Fisher, InfLoRA's input statistics, OSF's merge and SVD); included in "
    "domain s",
    "state": "bytes of the method's state kept across domains (`state_tensors()`, the stack's "
    "method_state.safetensors: EWC Fisher + anchor, replay token ids, InfLoRA input memory), "
    "after domain 2",
    "copies": "bytes of weight copies held in memory while training domain 2: adapters that no "
    "domain answers with (LwF's teacher) and tensors in the method's attributes that are neither "
    "model weights nor state (O-LoRA's stacked earlier down-projections)",
    "backbone": "bytes of the CRMA backbone's parameters (crma methods)",
    "extra memory": "state + copies + backbone: memory beyond the adapters and the base",
    "adapters": "bytes of the adapters the 2 domains answer with (parameters and buffers: "
    "one shared LoRA, a LoRA per domain, or OSF's SVD factors)",
    "on disk": "bytes of the stack folder after domain 2 (adapters, OSF's merged base weights, "
    "backbone, method state, router, manifest)",
}


def domain_examples(source: str, tokenizer, n: int, max_length: int) -> tuple[str, list[dict]]:
    """(name, first `n` tokenized training examples) of a corpus domain or a .jsonl/.txt file."""
    from crma.data import DOMAINS, corpus_file, load_records, tokenize_records

    path = corpus_file(source, "train") if source in DOMAINS else Path(source)
    name = source if source in DOMAINS else path.name.split(".")[0]
    return name, tokenize_records(load_records(path)[:n], tokenizer, max_length)


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_bytes(engine, adapter: str) -> int:
    return nbytes(
        [*engine.adapter_state(adapter).values(), *engine.adapter_buffers(adapter).values()]
    )


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def copies_bytes(engine, method, domains: list[str]) -> int:
    """Weight copies the method holds beyond the model and its state (see COLUMNS["copies"])."""
    taken = {
        t.untyped_storage().data_ptr()
        for t in (*engine.model.parameters(), *engine.model.buffers())
    }
    taken |= {t.untyped_storage().data_ptr() for t in method.state_tensors().values()}
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in _tensors(vars(method))
        if t.untyped_storage().data_ptr() not in taken
    }
    spare = set(engine.adapters) - {method.adapter_name(d) for d in domains}
    return sum(held.values()) + sum(adapter_bytes(engine, a) for a in spare)


class Probe:
    """Wraps one method instance's hooks: step start times, task work time, what trains."""

    def __init__(self, cm):
        method = cm.method
        self.step_starts: list[float] = []
        self.task_work = 0.0
        self.trainable = 0
        self.copies = 0
        batch_examples, trainable_groups = method.batch_examples, method.trainable_groups
        begin_task, end_task = method.begin_task, method.end_task

        def stamped_batch(task, step, batch):
            self.step_starts.append(time.perf_counter())
            return batch_examples(task, step, batch)

        def counted_groups(engine, task):
            groups = trainable_groups(engine, task)
            self.trainable = sum(p.numel() for g in groups for p in g["params"])
            return groups

        def timed_begin(engine, task, examples):
            start = time.perf_counter()
            begin_task(engine, task, examples)
            self.task_work += time.perf_counter() - start

        def timed_end(engine, task, examples):
            self.copies = copies_bytes(engine, method, [*method.trained, task.domain])
            start = time.perf_counter()
            end_task(engine, task, examples)
            self.task_work += time.perf_counter() - start

        method.batch_examples, method.trainable_groups = stamped_batch, counted_groups
        method.begin_task, method.end_task = timed_begin, timed_end

    def step_times(self) -> list[float]:
        """Durations of the steps with a next step, the first (warm-up) left out."""
        s = self.step_starts
        return [b - a for a, b in zip(s[1:-1], s[2:], strict=True)]


class Bench:
    """One base model, one data set of two domains, one folder of stacks: builds and times."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        from accelerate import Accelerator

        from crma.model import base_model_id, load_base
        from crma.train import TrainConfig

        self.folder = folder
        self.base, self.tokenizer = load_base(args.base)
        self.base_id = base_model_id(args.base)
        self.domains = [
            domain_examples(s, self.tokenizer, args.examples, args.max_length)
            for s in args.domains.split(",")
        ]
        self.config = TrainConfig(
            batch_size=args.batch_size,
            max_steps=args.steps,
            max_length=args.max_length,
            precision="fp32",
            log_every=args.steps,  # metrics only at the last step: logging is not the method
            checkpoint_every=args.steps,
        )
        self.accelerator = Accelerator(cpu=True)

    def open(self, path: Path, spec=None):
        """The stack at `path`, created with `spec` (a StackSpec) if it is new."""
        from crma.continual import ContinualModel

        def fresh_model():  # attach_crma and OSF's merges change the model: one copy per stack
            return copy.deepcopy(self.base), self.tokenizer

        return ContinualModel.open_or_create(path, fresh_model, self.base_id, spec)

    def add(self, cm, index: int, method: str) -> float:
        """Train domain `index` into `cm`; its wall time in seconds."""
        name, examples = self.domains[index]
        metrics = cm.stack.path.parent / f"{cm.stack.path.name}-metrics.jsonl"
        start = time.perf_counter()
        cm.add_domain(name, examples, self.config, self.accelerator, 0, metrics, {"method": method})
        return time.perf_counter() - start

    def build(self, method: str, spec) -> None:
        """The condition's stack after domain 1, kept as the template of every timed run."""
        self.add(self.open(self.folder / method, spec), 0, method)
        gc.collect()

    def time_domain_2(self, method: str) -> dict[str, Any]:
        """Domain 2 on a fresh copy of the method's domain-1 stack: timings and sizes."""
        path = self.folder / f"{method}-run"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(self.folder / method, path)
        cm = self.open(path)
        probe = Probe(cm)
        domain_s = self.add(cm, 1, method)
        engine, m = cm.engine, cm.method
        backbone = list(engine.backbone.parameters()) if engine.backbone is not None else []
        result = {
            "steps": probe.step_times(),
            "domain_s": domain_s,
            "task_work_s": probe.task_work,
            "trainable": probe.trainable,
            "state": nbytes(m.state_tensors().values()),
            "copies": probe.copies,
            "backbone": nbytes(backbone),
            "adapters": sum(
                adapter_bytes(engine, a) for a in dict.fromkeys(map(m.adapter_name, m.trained))
            ),
            "on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "needs_task_id": m.needs_task_id,
        }
        del cm, probe, engine, m
        gc.collect()
        return result


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method: medians over rounds (steps pooled), sizes, and the ratios to naive."""
    out = {}
    for method, results in runs.items():
        last = results[-1]  # sizes are the same every round (same seed, same data)
        step_s = statistics.median(t for r in results for t in r["steps"])
        out[method] = {
            "needs_task_id": last["needs_task_id"],
            "trainable": last["trainable"],
            "step_s": step_s,
            "domain_s": statistics.median(r["domain_s"] for r in results),
            "task_work_s": statistics.median(r["task_work_s"] for r in results),
            **{k: last[k] for k in ("state", "copies", "backbone", "adapters", "on_disk")},
            "extra_memory": last["state"] + last["copies"] + last["backbone"],
        }
    naive = out["naive"]
    for row in out.values():
        row["extra_trainable"] = row["trainable"] - naive["trainable"]
        row["step_x"] = row["step_s"] / naive["step_s"]
        row["domain_x"] = row["domain_s"] / naive["domain_s"]
    return out


def size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of `summarise`'s rows, then each column's definition."""
    lines = [
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for method, r in rows.items():
        cells = [
            "yes" if r["needs_task_id"] else "no",
            f"{r['trainable']:,}",
            f"{r['extra_trainable']:+,}",
            f"{1000 * r['step_s']:.1f}",
            f"{r['step_x']:.2f}",
            f"{r['domain_s']:.2f}",
            f"{r['domain_x']:.2f}",
            f"{r['task_work_s']:.2f}",
            *(size(r[k]) for k in ("state", "copies", "backbone", "extra_memory")),
            *(size(r[k]) for k in ("adapters", "on_disk")),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- **{name}**: {meaning}" for name, meaning in COLUMNS.items())]
    return "\n".join(lines) + "\n"


def conditions(args: argparse.Namespace) -> dict[str, Any]:
    """Name -> StackSpec of every condition to measure, naive first: each method at its
    defaults, or `--config`'s method entries (by label) with their own settings."""
    from crma.backbone import CRMAConfig
    from crma.continual import StackSpec
    from crma.engine import LoraSettings
    from crma.methods import METHODS

    default = {m: StackSpec(m, {}, LoraSettings(), CRMAConfig()) for m in METHODS}
    if args.config is not None:
        from crma.protocol.config import load_config, method_settings

        config = load_config(args.config)
        specs = {m.key: method_settings(config, m)[0] for m in config.methods}
        return {"naive": specs.get("naive", default["naive"])} | specs
    names = list(dict.fromkeys(["naive", *(args.methods or ",".join(METHODS)).split(",")]))
    if unknown := [m for m in names if m not in METHODS]:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return {m: default[m] for m in names}


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Build every condition's domain-1 stack, time domain 2 in rotated rounds, summarise."""
    specs = conditions(args)
    methods = list(specs)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args, Path(tmp))
        for i, method in enumerate(methods, 1):
            progress(f"domain 1: {method} ({i}/{len(methods)})")
            bench.build(method, specs[method])
        for k in range(args.rounds):
            for i, method in enumerate(methods[k % len(methods) :] + methods[: k % len(methods)]):
                progress(f"round {k + 1}/{args.rounds}: {method} ({i + 1}/{len(methods)})")
                runs[method].append(bench.time_domain_2(method))
    return summarise(runs)


def progress(line: str) -> None:
    """One line per stage on stderr: the whole run takes tens of minutes."""
    print(f"[methods.py] {line}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from crma.methods import METHODS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="embedded", help="base model (embedded or a path)")
    parser.add_argument(
        "--methods", default=None, help=f"comma list (naive added; default: {','.join(METHODS)})"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a protocol config (configs/baselines.yaml): measure its method entries, each "
        "with its own options, LoRA and backbone settings, named by label (instead of --methods)",
    )
    parser.add_argument(
        "--domains",
        default="medical,code",
        help="two corpus domains or .jsonl/.txt training files (named by the file name's stem)",
    )
    parser.add_argument("--examples", type=int, default=32, help="training texts per domain")
    parser.add_argument("--rounds", type=int, default=3, help="timed domain-2 runs per method")
    parser.add_argument("--steps", type=int, default=6, help="steps per domain (>= 3)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.config is not None and args.methods is not None:
        parser.error("--methods: not with --config (the config's entries are the conditions)")
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config: {args.config}: no such file")
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first and last steps are not timed)")
    if len(args.domains.split(",")) != 2:
        parser.error("--domains takes exactly two domains")
    return args


def main(argv: list[str] | None = None) -> None:
    from crma.fileio import write_json, write_text

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    text = (
        f"Domain 2 after domain 1, {args.rounds} rounds x {args.steps} steps, batch "
        f"{args.batch_size} x {args.max_length} tokens, {args.examples} examples per domain, "
        f"{args.threads} threads, base {args.base}\n\n" + table(rows)
    )
    print(text)
    if args.out is not None:
        write_text(args.out.with_suffix(".md"), text)
        write_json(
            args.out.with_suffix(".json"),
            {
                "settings": {
                    **vars(args),
                    "out": str(args.out),
                    "config": args.config and str(args.config),
                },
                "columns": COLUMNS,
                "methods": rows,
            },
        )


if __name__ == "__main__":
    main()
