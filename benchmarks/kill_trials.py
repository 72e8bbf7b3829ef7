"""Kill-anywhere trials: SIGKILL `crma train`, `crma run` and `crma export` at seeded random
moments, rerun the same command, and compare every file with an uninterrupted run.

    .venv/bin/python benchmarks/kill_trials.py [--trials 20] [--seed 0] [--work DIR]

Scenarios run on the tiny test model (tests/assets): `train` adds two domains to a crma stack,
`run` is the protocol (configs/tiny.yaml, naive and crma, 6 steps a domain, a checkpoint every
2), `export` copies that run's results. A moment is the N-th occurrence of an event inside the
child process, which kills itself with SIGKILL right there:

    step         a training step's gradients are computed, the optimizer has not stepped
    checkpoint   a checkpoint is written to its temporary file, not yet renamed
    commit-file  an adapter, backbone, router or method-state file of a commit, not renamed
    commit       the manifest is renamed (the commit point), old files not yet deleted
    json         any JSON/text file (manifest, loss matrix, eval cache, report) not renamed
    eval         a held-out loss is computed, not yet cached
    plot         a report plot is written, not renamed
    export       a file is copied into the export's temporary folder

Uninterrupted reference runs count each event; trial i takes the scenarios' events in a
seeded order and a seeded N. After the kill the same command is run again, plainly; the trial
is identical when the output tree holds the same files with the same bytes, except the
manifest's timestamps and the per-step throughput in metrics.jsonl. Prints one line per trial
and "k/N identical".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = ROOT / "tests" / "assets" / "tiny-llama"
TINY_DATA = ROOT / "tests" / "assets" / "tiny-domains"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
VOLATILE = {"created", "finished", "tokens_per_s", "train_seconds"}  # wall-clock, not results

# event -> (module, attribute, how the kill point sits relative to the original call)
EVENTS = {
    "step": ("crma.train", "Trainer._step", "after"),
    "checkpoint": ("crma.train", "atomic_path", "inside"),
    "commit-file": ("crma.stack", "atomic_path", "inside"),
    "commit": ("crma.stack", "Stack.collect_garbage", "before"),
    "json": ("crma.fileio", "atomic_path", "inside"),
    "eval": ("crma.protocol.run", "mean_token_loss", "after"),
    "plot": ("crma.report.plots", "atomic_path", "inside"),
    "export": ("shutil", "copy2", "after"),
}
TRAIN = [
    "train", "{out}", "--base", str(TINY_BASE), "--method", "crma", "--max-steps", "8",
    "--checkpoint-every", "3", "--max-length", "32", "--batch-size", "4", "--lr", "0.03",
    "--lora-r", "4", "--domain", f"alpha={TINY_DATA / 'alpha.train.jsonl'}",
    "--domain", f"beta={TINY_DATA / 'beta.train.jsonl'}",
]  # fmt: skip
RUN = [
    "run", str(TINY_CONFIG), "--out", "{out}", "--set", "methods=[naive, crma]",
    "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2",
]  # fmt: skip
SCENARIOS = {"train": TRAIN, "run": RUN, "export": ["export", "{run}", "{out}"]}


# -- the child: crma with one kill point (or counting them all) --------------------------------
def child(point: str, counts_file: str | None, args: list[str]) -> int:
    """Run `crma args` in this process; `point` is EVENT:N (SIGKILL at its N-th occurrence)
    or `count` (count every event, written to `counts_file` at the end)."""
    import importlib

    seen = dict.fromkeys(EVENTS, 0)
    target, _, at = point.partition(":")

    def hit(event: str) -> None:
        seen[event] += 1
        if event == target and seen[event] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)

    for event, (module, attribute, where) in EVENTS.items():
        if target in (event, "count"):
            owner = importlib.import_module(module)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, _wrapped(getattr(owner, name), where, lambda e=event: hit(e)))
    from crma.cli import main

    code = main(args)
    if counts_file:
        Path(counts_file).write_text(json.dumps(seen))
    return code


def _wrapped(original: Callable, where: str, hit: Callable[[], None]) -> Callable:
    if where == "inside":  # a context manager: after the block wrote the temporary, before rename

        @contextmanager
        def inside(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with original(*args, **kwargs) as tmp:
                yield tmp
                hit()

        return inside

    def call(*args: Any, **kwargs: Any) -> Any:
        if where == "before":
            hit()
        result = original(*args, **kwargs)
        if where == "after":
            hit()
        return result

    return call


# -- the driver ---------------------------------------------------------------------------------
def env() -> dict[str, str]:
    """One thread, so that two runs of the same command give bit-identical numbers."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }


def command(scenario: str, out: Path, run: Path | None = None) -> list[str]:
    return [a.format(out=out, run=run) for a in SCENARIOS[scenario]]


def run_child(args: list[str], point: str, counts: Path | None = None) -> int:
    cmd = [sys.executable, __file__, "--child", point]
    cmd += ["--counts", str(counts)] if counts else []
    proc = subprocess.run([*cmd, "--", *args], cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"crma {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.returncode


def reference(scenario: str, out: Path, run: Path | None = None) -> dict[str, int]:
    """Run `scenario` uninterrupted into `out`; return how often each event happened."""
    counts = out.with_name(out.name + ".counts.json")
    run_child(command(scenario, out, run), "count", counts)
    return json.loads(counts.read_text())


def trial(scenario: str, point: str, out: Path, ref: Path, run: Path | None = None) -> list[str]:
    """Kill `scenario` at `point` (EVENT:N), rerun it plainly; the files that differ from `ref`."""
    args = command(scenario, out, run)
    if run_child(args, point) != -signal.SIGKILL:
        return [f"(not killed: {point} never happened)"]
    rerun = subprocess.run(
        [sys.executable, "-m", "crma", *args], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    if rerun.returncode != 0:
        return [f"(rerun failed: {rerun.stderr.strip().splitlines()[-1]})"]
    return differences(ref, out)


def differences(a: Path, b: Path) -> list[str]:
    """Relative paths whose presence or (normalised) content differ between trees a and b."""
    ta, tb = _tree(a), _tree(b)
    return sorted(rel for rel in ta.keys() | tb.keys() if ta.get(rel) != tb.get(rel))


def _tree(root: Path) -> dict[str, Any]:
    return {
        p.relative_to(root).as_posix(): _content(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _content(path: Path) -> Any:
    if path.name in ("manifest.json", "loss_matrix.json"):
        return _without_volatile(json.loads(path.read_text()))
    if path.name == "metrics.jsonl":
        return [_without_volatile(json.loads(line)) for line in path.read_text().splitlines()]
    return path.read_bytes()


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the runs (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill-trials-"))
    refs = {s: work / f"ref-{s}" for s in SCENARIOS}
    counts = {s: reference(s, refs[s], refs["run"]) for s in ("train", "run", "export")}
    moments = [(s, e) for s in SCENARIOS for e, n in counts[s].items() if n > 0]
    print(f"events per reference run: {json.dumps(counts)}", flush=True)
    rng = random.Random(args.seed)
    rng.shuffle(moments)
    identical = 0
    for i in range(args.trials):
        scenario, event = moments[i % len(moments)]
        point = f"{event}:{rng.randint(1, counts[scenario][event])}"
        diff = trial(scenario, point, work / f"trial-{i}", refs[scenario], refs["run"])
        identical += not diff
        verdict = "identical" if not diff else "DIFFERENT: " + ", ".join(diff[:5])
        print(f"trial {i + 1:2d}: {scenario:6s} killed at {point:14s} -> {verdict}", flush=True)
    print(f"{identical}/{args.trials} identical")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        rest = sys.argv[2:]
        sep = rest.index("--")
        opts, crma_args = rest[:sep], rest[sep + 1 :]
        counts_path = opts[opts.index("--counts") + 1] if "--counts" in opts else None
        sys.exit(child(opts[0], counts_path, crma_args))
    sys.exit(main())
