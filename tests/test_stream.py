"""`crma segment` and `crma stream` on the tiny model, on tiny domains with sharp switches."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_BASE, crma_env
from stacks import WORDS, build_stack

from crma.cli import main
from crma.stream.detector import DetectorSettings
from crma.stream.metrics import match

# Documents of 60 words: long enough that the random tiny model's mean-pooled states of two
# word sets differ by more than documents of one set do. Thresholds set for this model (the
# defaults are the embedded model's).
DETECTOR = ["--threshold", "2.0", "--known-threshold", "0.5"]
# Whole documents, so the router's entries (embedded from the training examples) are what the
# detector sees when a later stream meets these domains again.
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--max-length", "128", "--precision", "fp32"]
PLAN = [("medic", 40), ("money", 40), ("medic", 40), ("code", 40)]
TRUE_BOUNDARIES = [40, 80, 120]


def write_stream(path: Path, plan: list[tuple[str, int]], seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": " ".join(rng.choices(WORDS[domain], k=60))})
        for domain, n in plan
        for _ in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def crma(*argv: str, stdin: bytes | None = None) -> str:
    """Run crma in this process; its stdout."""
    out = io.StringIO()
    old_in, old_out = sys.stdin, sys.stdout
    sys.stdout = out
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        assert main(list(argv)) == 0
    finally:
        sys.stdin, sys.stdout = old_in, old_out
    return out.getvalue()


def test_segment_finds_every_switch_and_the_revisit(tmp_path):
    stream = write_stream(tmp_path / "s.jsonl", PLAN)
    out = tmp_path / "seg.json"
    crma("segment", str(stream), "--base", str(TINY_BASE), "--out", str(out), *DETECTOR)
    result = json.loads(out.read_text())
    segs = result["segments"]
    assert [s["domain"] for s in segs] == ["new-1", "new-2", "new-1", "new-3"]
    assert [s["new"] for s in segs] == [True, True, False, True]
    found = [s["start"] for s in segs[1:]]
    assert len(match(TRUE_BOUNDARIES, found, margin=10)) == 3, found
    decisions = result["decisions"]
    assert [d["index"] for d in decisions] == list(range(160))
    assert all(d["decided_at"] >= d["index"] for d in decisions)  # online: never before


def test_segment_reads_stdin_and_a_stationary_stream_has_no_boundary(tmp_path):
    stream = write_stream(tmp_path / "s.jsonl", [("code", 150)], seed=3)
    text = crma("segment", "-", "--base", str(TINY_BASE), *DETECTOR, stdin=stream.read_bytes())
    segs = json.loads(text)["segments"]
    assert [(s["start"], s["end"], s["domain"]) for s in segs] == [(0, 150, "new-1")]


def test_known_domains_are_the_routers_statistics(tmp_path):
    from crma.routing.index import CentroidRouter
    from crma.stack import Stack
    from crma.stream.segment import known_domains

    build_stack(tmp_path / "S", ["medic", "money"], steps=1)
    stack = Stack.open(tmp_path / "S")
    known, settings = known_domains(stack)
    router = CentroidRouter.load(stack)
    assert list(known) == ["medic", "money"] and settings == router.settings
    for i, name in enumerate(router.domains):
        assert known[name].count == float(router.count[i])
        assert torch.equal(known[name].sum, router.sum[i])
        assert torch.equal(known[name].sumsq, router.sumsq[i])


# -- crma stream -------------------------------------------------------------------------------
def stream_args(stack: Path, stream: Path) -> list[str]:
    return [
        "stream", str(stack), "--input", str(stream), "--base", str(TINY_BASE),
        "--min-segment", "20", *DETECTOR, *TRAIN,
    ]  # fmt: skip


def logged(stack: Path) -> list[dict]:
    """The log's events without wall-clock times."""
    events = [json.loads(line) for line in (stack / "stream.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "seconds"} for e in events]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted `crma stream` of PLAN into a new stack."""
    work = tmp_path_factory.mktemp("stream")
    stream = write_stream(work / "s.jsonl", PLAN)
    crma(*stream_args(work / "S", stream))
    return work / "S", stream


def test_stream_trains_one_adapter_per_new_domain(reference):
    from crma.stack import Stack

    stack, _ = reference
    assert Stack.open(stack).domains == ["new-1", "new-2", "new-3"]
    events = logged(stack)
    trained = [e for e in events if e["event"] == "trained"]
    assert [(e["domain"], e["first"], e["last"]) for e in trained] == [
        ("new-1", 0, 19),
        ("new-2", 40, 59),
        ("new-3", 120, 139),
    ]
    manifest = json.loads((stack / "manifest.json").read_text())
    assert manifest["router"]["domains"] == ["new-1", "new-2", "new-3"]
    decisions = [e for e in events if e["event"] == "decision"]
    assert [d["index"] for d in decisions] == list(range(160))


def test_stream_rerun_after_done_changes_nothing(reference):
    stack, stream = reference
    before = (stack / "stream.jsonl").read_bytes()
    crma(*stream_args(stack, stream))
    assert (stack / "stream.jsonl").read_bytes() == before


def test_a_later_stream_routes_known_domains_and_refresh_retrains_them(reference, tmp_path):
    import shutil

    from crma.stack import Stack

    stack = tmp_path / "S"
    shutil.copytree(reference[0], stack)
    before = {d: adapter_bytes(stack, d) for d in ("new-1", "new-2", "new-3")}
    later = write_stream(tmp_path / "later.jsonl", [("money", 25), ("code", 25)], seed=7)
    crma(*stream_args(stack, later), "--refresh")
    run = logged(stack)[len(logged(reference[0])) :]  # this stream's events
    segments = [(e["domain"], e["new"]) for e in run if e["event"] == "segment"]
    assert segments == [("new-2", False), ("new-3", False)]
    assert [e["domain"] for e in run if e["event"] == "refreshed"] == ["new-2", "new-3"]
    assert not [e for e in run if e["event"] == "trained"]
    assert Stack.open(stack).domains == ["new-1", "new-2", "new-3"]
    assert adapter_bytes(stack, "new-1") == before["new-1"]  # not in this stream: untouched
    assert adapter_bytes(stack, "new-2") != before["new-2"]


def adapter_bytes(stack: Path, domain: str) -> bytes:
    from helpers import adapter_file

    return adapter_file(stack, domain).read_bytes()


def test_an_unfinished_stream_of_another_input_is_refused(reference, tmp_path, capsys):
    import shutil

    stack = tmp_path / "S"
    shutil.copytree(reference[0], stack)
    lines = (stack / "stream.jsonl").read_text().splitlines()
    (stack / "stream.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # no "done": killed
    other = write_stream(tmp_path / "other.jsonl", [("code", 30)], seed=5)
    assert main(stream_args(stack, other)) == 2
    assert "(another input) is unfinished; rerun that command" in capsys.readouterr().err


def test_an_unfinished_stream_logged_before_a_setting_existed_resumes(reference, tmp_path):
    """A start event written by an older crma lacks the settings added since: they read as
    their defaults, so the rerun resumes it (not refused as another stream's)."""
    import shutil

    stack = tmp_path / "S"
    shutil.copytree(reference[0], stack)
    events = [json.loads(line) for line in (stack / "stream.jsonl").read_text().splitlines()]
    del events[0]["train"]["deepspeed"], events[0]["detector"]["confirm"]
    older = [json.dumps(e) for e in events[:-1]]  # no "done": killed
    (stack / "stream.jsonl").write_text("\n".join(older) + "\n")
    crma(*stream_args(stack, reference[1]))
    assert logged(stack)[1:] == logged(reference[0])[1:]


def test_a_stream_logged_before_the_known_band_resumes_only_without_it(reference, tmp_path, capsys):
    """The known band changes decisions: a log made before it existed was made without it.
    Resuming it with the band is refused, naming the setting; with --known-band 0 it resumes."""
    import shutil

    stack = tmp_path / "S"
    shutil.copytree(reference[0], stack)
    events = [json.loads(line) for line in (stack / "stream.jsonl").read_text().splitlines()]
    del events[0]["detector"]["known_band"]
    (stack / "stream.jsonl").write_text("\n".join(json.dumps(e) for e in events[:-1]) + "\n")
    assert main(stream_args(stack, reference[1])) == 2
    err = capsys.readouterr().err
    band = DetectorSettings().known_band
    assert f"(detector.known_band: logged 0.0, now {band}) is unfinished" in err, err
    crma(*stream_args(stack, reference[1]), "--known-band", "0")
    assert logged(stack)[1:] == logged(reference[0])[1:]


KILLER = """
import os, signal, sys
import importlib
module, attribute, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
cls, name = attribute.split(".")
original, calls = getattr(getattr(owner, cls), name), [0]
def killing(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(getattr(owner, cls), name, killing)
from crma.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    "point",
    [
        ("crma.stream.learner", "StreamLog.append", 2),  # after one chunk, before any commit
        ("crma.train", "Trainer._step", 3),  # training the second new domain
    ],
    ids=["log", "training"],
)
def test_stream_killed_and_rerun_makes_the_same_decisions(reference, tmp_path, point):
    from crma.stack import Stack

    ref_stack, stream = reference
    args = stream_args(tmp_path / "S", stream)
    env = crma_env() | {"PYTHONPATH": str(ROOT / "src")}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, point), *args], env=env, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert logged(tmp_path / "S") != logged(ref_stack)  # it stopped part way
    crma(*args)
    assert logged(tmp_path / "S") == logged(ref_stack)
    assert Stack.open(tmp_path / "S").domains == Stack.open(ref_stack).domains


def test_stream_with_the_true_segments_trains_each_new_domain_on_its_first_documents(tmp_path):
    from accelerate import Accelerator

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data.formats import load_records
    from crma.engine import LoraSettings
    from crma.model import base_model_id, load_base
    from crma.stream.detector import DetectorSettings
    from crma.stream.learner import StreamLearner, StreamSettings
    from crma.train import TrainConfig

    stream = write_stream(tmp_path / "s.jsonl", PLAN)
    truth = [{"start": 40 * i, "end": 40 * i + 40, "domain": d} for i, (d, _) in enumerate(PLAN)]
    spec = StackSpec("crma", {}, LoraSettings(), CRMAConfig())
    base = str(TINY_BASE)
    cm = ContinualModel.open_or_create(
        tmp_path / "S", lambda: load_base(base), base_model_id(base), spec
    )
    train = TrainConfig(max_steps=2, batch_size=4, max_length=128, precision="fp32")
    learner = StreamLearner(
        cm, stream, StreamSettings(min_segment=20), DetectorSettings(), train, Accelerator(),
        truth=truth,
    )  # fmt: skip
    done = learner.run(load_records(stream))
    assert [(s["start"], s["domain"], s["new"]) for s in done["segments"]] == [
        (0, "medic", True),
        (40, "money", True),
        (80, "medic", False),
        (120, "code", True),
    ]
    trained = [e for e in logged(tmp_path / "S") if e["event"] == "trained"]
    assert [(e["domain"], e["first"], e["last"]) for e in trained] == [
        ("medic", 0, 19),
        ("money", 40, 59),
        ("code", 120, 139),
    ]
