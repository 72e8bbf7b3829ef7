"""The stack format: atomic commits under fresh names, integrity checks, format-1 stacks,
readers that see one committed state, one writer at a time."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_BASE, TINY_DATA, committed
from stacks import build_stack

from crma import UserError
from crma.integrity import check_stack
from crma.lock import LOCK_FILE, WriterLock, check_free
from crma.stack import Stack, check_domain_name

BASE = {"name": "m", "sha256": "ab"}
FORMAT_1 = ROOT / "tests" / "assets" / "stack-format1"


def commit_domain(stack: Stack, name: str, content: bytes = b"weights", replace: bool = False):
    """Commit a domain whose 'adapter' is one small file (the format does not look inside)."""
    commit = stack.begin_commit()
    folder = commit.write(
        f"adapters/{name}",
        lambda tmp: (tmp / "adapter_model.safetensors").write_bytes(content),
        True,
    )
    backbone = commit.write("crma_backbone.safetensors", lambda tmp: tmp.write_bytes(content))
    commit.set_component("backbone", backbone)
    commit.record_domain({"name": name, "adapter": f"d-{name}"}, folder, replace=replace)
    commit.finish()
    return folder, backbone


def tree(path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_a_directory_becomes_a_stack_when_its_first_domain_commits(tmp_path):
    stack = Stack.new(tmp_path / "s", BASE, "frozen", {})
    assert not (tmp_path / "s").exists(), "nothing is written before the first commit"
    commit = stack.begin_commit()
    folder = commit.write("adapters/alpha", lambda tmp: (tmp / "w").write_bytes(b"1"), True)
    commit.record_domain({"name": "alpha", "adapter": "d-alpha"}, folder)
    assert not Stack.exists(tmp_path / "s"), "files written, not committed: no stack yet"
    commit.finish()
    opened = Stack.open(tmp_path / "s")
    assert opened.domains == ["alpha"] and opened.manifest["files"]["adapters/alpha/w"]["size"] == 1
    with pytest.raises(UserError, match="already exists"):
        opened.begin_commit().record_domain({"name": "alpha", "adapter": "d-alpha"}, folder)


def test_a_commit_never_rewrites_a_committed_file_and_deletes_what_it_replaced(tmp_path):
    stack = Stack.new(tmp_path / "s", BASE, "crma", {})
    commit_domain(stack, "alpha", b"v1")
    assert tree(tmp_path / "s") == {
        "manifest.json", "adapters/alpha/adapter_model.safetensors", "crma_backbone.safetensors"
    }  # fmt: skip
    # leftovers of a commit killed before its manifest: uncommitted files and a temporary
    (tmp_path / "s" / "router.7.safetensors").write_bytes(b"x")
    (tmp_path / "s" / "adapters" / "beta").mkdir()
    (tmp_path / "s" / ".manifest.json.tmp99999999").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("the user's")
    folder, backbone = commit_domain(stack, "alpha", b"v2", replace=True)
    assert (folder, backbone) == ("adapters/alpha.2", "crma_backbone.2.safetensors")
    assert tree(tmp_path / "s") == {
        "manifest.json", "adapters/alpha.2/adapter_model.safetensors",
        "crma_backbone.2.safetensors", "notes.txt",
    }  # fmt: skip
    assert commit_domain(stack, "alpha", b"v3", replace=True)[0] == "adapters/alpha"
    reopened = Stack.open(tmp_path / "s")
    assert (reopened.adapter_dir("alpha") / "adapter_model.safetensors").read_bytes() == b"v3"
    assert reopened.generation == 3


def test_opening_checks_every_file_against_the_manifest(tmp_path):
    stack = Stack.new(tmp_path / "s", BASE, "crma", {})
    commit_domain(stack, "alpha", b"12345678")
    weights = tmp_path / "s" / "adapters" / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(b"1234")
    with pytest.raises(
        UserError, match=r"adapter_model.safetensors: 4 bytes, the manifest recorded 8"
    ):
        Stack.open(tmp_path / "s")
    weights.write_bytes(b"12345679")  # same size, other content
    with pytest.raises(UserError, match="sha256 differs from the manifest's"):
        Stack.open(tmp_path / "s")
    weights.unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors: missing"):
        Stack.open(tmp_path / "s")


@pytest.mark.parametrize(
    "manifest, message",
    [
        (b"{", "not valid JSON"),
        (b'{"a": "\x80"}', "not valid JSON (not UTF-8)"),
        (b"[1]", "not a JSON object"),
        (b'{"format": 3}', "stack format 3; this crma reads formats 1 and 2"),
        (b'{"format": 2, "generation": 1}', "missing or malformed field"),
    ],
)
def test_a_damaged_manifest_is_one_clear_error(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_bytes(manifest)
    with pytest.raises(UserError, match=re.escape(message)):
        Stack.open(tmp_path)


def test_manifest_paths_never_leave_the_stack(tmp_path):
    stack = Stack.new(tmp_path / "s", BASE, "crma", {})
    commit_domain(stack, "alpha")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["adapters"]["d-alpha"] = "../elsewhere"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="malformed field.*elsewhere"):
        Stack.open(tmp_path / "s")


def test_a_new_stack_takes_an_earlier_failed_call_leftovers_but_no_foreign_files(tmp_path):
    leftovers = tmp_path / "retry"
    (leftovers / "checkpoint").mkdir(parents=True)
    (leftovers / LOCK_FILE).write_text("")
    (leftovers / "metrics.jsonl").write_text("")
    Stack.new(leftovers, BASE, "crma", {})  # no error
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(UserError, match="not a crma stack.*'file'"):
        Stack.new(tmp_path / "junk", BASE, "crma", {})
    with pytest.raises(UserError, match="stack was trained on base"):
        Stack.new(tmp_path / "x", BASE, "crma", {}).check_base({"name": "m", "sha256": "cd"})


@pytest.mark.parametrize(
    "name", ["medical", "a1", "code-py", "EU_law", "a", "lora", "o", "ra", "osf", "ewc", "naive",
             "subspace", "default", "checkpoint", "layers", "model", "0", "x" * 64],
)  # fmt: skip
def test_domain_names_are_the_users(name):
    assert check_domain_name(name) == name


@pytest.mark.parametrize(
    "name", ["../etc", "med.v2", "", "-x", "_x", "a b", "x" * 65, "auto", "base"]
)
def test_names_that_are_not_folder_names_or_are_reserved_are_refused(name):
    with pytest.raises(UserError, match="domain name"):
        check_domain_name(name)


def test_domain_names_inside_peft_and_module_names_train_and_reload(tmp_path):
    """`a` and `lora` sit inside PEFT's prefix `lora_`, `layers` and `0` inside every parameter
    name: each domain must still own exactly its adapter's weights, on disk and reloaded."""
    from crma.generate import load_stack

    names = ["a", "lora", "layers", "0"]
    sources = dict(zip(names, ["medic", "money", "code", "physics"]))
    cm = build_stack(tmp_path / "s", names, method="frozen", steps=2, sources=sources)
    reopened = load_stack(tmp_path / "s").cm
    for name in names:
        adapter = cm.method.adapter_name(name)
        want, got = cm.engine.adapter_state(adapter), reopened.engine.adapter_state(adapter)
        assert len(want) == 2 * 2 * 2 and want.keys() == got.keys()  # 2 layers x q, v x A, B
        assert all((want[k] == got[k]).all() for k in want), name


def test_format_1_stack_opens_as_it_was_and_is_upgraded_by_its_next_commit(tmp_path):
    """tests/assets/stack-format1 was written by crma before this format; its holdout losses
    and routed generation were recorded then (stack-format1.expected.json)."""
    from accelerate import Accelerator

    from crma.data import load_records, tokenize_records
    from crma.eval.loss import mean_token_loss
    from crma.generate import load_stack
    from crma.train import TrainConfig

    stack = tmp_path / "old"
    shutil.copytree(FORMAT_1, stack)
    before = {p: (stack / p).read_bytes() for p in tree(stack)}
    expected = json.loads((ROOT / "tests/assets/stack-format1.expected.json").read_text())
    model = load_stack(stack, str(TINY_BASE))
    cm = model.cm
    for d in ("alpha", "beta"):
        holdout = load_records(TINY_DATA / f"{d}.holdout.jsonl")
        examples = tokenize_records(holdout, cm.engine.tokenizer, 32)
        loss = mean_token_loss(cm.engine, examples, cm.method.eval_adapters(d), 8)
        # float32 sums round differently on another CPU (seen: 2.5e-7): 1e-6 is far below what
        # the other domain's adapters move (about 0.1 on these domains)
        assert loss == pytest.approx(expected[d], rel=1e-6), d
    answer = model.generate("The heart pumps", "auto")
    assert (answer.domain, answer.text) == (
        expected["generate"]["domain"],
        expected["generate"]["text"],
    )
    assert "without recorded sha256 (format 1" in check_stack(stack)[0]
    assert {p: (stack / p).read_bytes() for p in tree(stack)} == before, "reading writes nothing"

    records = load_records(TINY_DATA / "gamma.train.jsonl")
    cfg = TrainConfig(lr=0.03, batch_size=4, max_steps=2, max_length=32, precision="fp32")
    examples = tokenize_records(records, cm.engine.tokenizer, 32)
    cm.add_domain("gamma", examples, cfg, Accelerator(cpu=True), 0, stack / "metrics.jsonl", {})
    manifest = json.loads((stack / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["backbone"] == "crma_backbone.1.safetensors"
    assert not (stack / "crma_backbone.safetensors").exists(), "the replaced file is gone"
    for old in ("adapters/alpha/adapter_model.safetensors", "adapters/beta/adapter_config.json"):
        assert (stack / old).read_bytes() == before[old]
        assert manifest["files"][old]["size"] == len(before[old])  # recorded by the upgrade
    assert load_stack(stack, str(TINY_BASE)).domains == ["alpha", "beta", "gamma"]
    assert "sizes and sha256 match" in check_stack(stack)[0]


def test_a_reader_loading_while_a_domain_is_replaced_sees_the_new_commit_whole(
    tmp_path, monkeypatch
):
    """The reader reads manifest N; before it loads alpha's adapter, a writer commits a new
    alpha (manifest N+1) and deletes the old folder. The reader must not mix the two."""
    from accelerate import Accelerator
    from stacks import texts

    from crma.data import tokenize_records
    from crma.engine import Engine
    from crma.generate import load_stack
    from crma.train import TrainConfig

    path = tmp_path / "s"
    writer = build_stack(path, ["medic", "money"], method="frozen", steps=2)
    load_adapter = Engine.load_adapter
    replaced = []

    def replace_first(engine, name, folder):
        if not replaced:
            records = [{"text": t} for t in texts("code", 40, seed=0)]
            examples = tokenize_records(records, writer.engine.tokenizer, 32)
            cfg = TrainConfig(lr=0.03, batch_size=8, max_steps=2, max_length=32, precision="fp32")
            writer.add_domain(
                "medic", examples, cfg, Accelerator(cpu=True), 0, path / "m", {}, replace=True
            )
            replaced.append(folder)
        return load_adapter(engine, name, folder)

    monkeypatch.setattr(Engine, "load_adapter", replace_first)
    reader = load_stack(path).cm
    assert replaced and not replaced[0].exists(), "the reader's first folder went away"
    assert reader.stack.generation == 3
    adapter = writer.method.adapter_name("medic")
    want, got = writer.engine.adapter_state(adapter), reader.engine.adapter_state(adapter)
    assert all((want[k] == got[k]).all() for k in want), "the reader has the new alpha"


def test_one_writer_at_a_time_and_the_refusal_names_the_holder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{}")
    with WriterLock(tmp_path / "s"):
        busy = rf"another crma process is writing here \(pid {os.getpid()} on .*, `crma .*`, since "
        with pytest.raises(UserError, match=busy):
            WriterLock(tmp_path / "s").__enter__()
    assert (tmp_path / "s" / LOCK_FILE).read_text() == "", "released: the holder line is cleared"
    dead = {"pid": 999999999, "host": "h", "command": "crma train", "since": "2020-01-01T00:00:00Z"}
    (tmp_path / "s" / LOCK_FILE).write_text(json.dumps(dead))
    with WriterLock(tmp_path / "s"):  # a dead holder's line, no kernel lock: taken over
        assert json.loads((tmp_path / "s" / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_probes_never_refuse_each_other_or_a_writer_but_see_a_holder(tmp_path):
    """The ranks of a resumed distributed run probe the stack together (CI once refused one)."""
    (tmp_path / "s").mkdir()
    busy = pytest.raises(UserError, match="another crma process is writing here")
    with WriterLock(tmp_path / "s"), busy:
        check_free(tmp_path / "s")
    probe = (
        "import sys, time\n"
        "from crma.lock import check_free\n"
        "end = time.time() + 1.5\n"
        "while time.time() < end:\n"
        "    check_free(sys.argv[1])\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", probe, str(tmp_path / "s")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stderr=subprocess.PIPE,
        text=True,
    )
    rounds = 0
    while other.poll() is None and rounds < 20_000:  # bounded: the child stops by itself
        check_free(tmp_path / "s")
        if rounds % 50 == 0:
            with WriterLock(tmp_path / "s"):
                pass
        rounds += 1
    assert other.wait(timeout=60) == 0, other.stderr.read()[-500:]
    assert rounds > 100, "the two processes probed side by side"


def test_a_lock_taken_for_a_new_directory_leaves_nothing_when_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError), WriterLock(tmp_path / "new" / "stack"):
        raise RuntimeError("a model-dependent setting failed")
    assert not (tmp_path / "new").exists()


def test_check_command_reports_every_component(tmp_path):
    stack = tmp_path / "s"
    build_stack(stack, ["medic", "money"], steps=2)
    out = "\n".join(check_stack(stack))
    for line in (
        "files ",
        "router ",
        "backbone ",
        "adapter    adapters/medic",
        "adapter    adapters/money",
    ):
        assert line in out
    assert "matches the base model" in out
    router = committed(stack, "router")
    data = bytearray(router.read_bytes())
    data[-1] ^= 1
    router.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(f"{router}: sha256 differs")):
        check_stack(stack)  # the CLI's exit 2 and one line: tests/test_bad_inputs.py


def test_a_non_finite_loss_stops_the_domain_and_commits_nothing(tmp_path, monkeypatch):
    """NaN at step 4: a one-line error naming domain and step, no stack, the step-3 checkpoint
    kept, metrics of the good steps only (strict JSON); a retry with other settings starts
    afresh and its metrics replace the failed attempt's."""
    import torch
    from accelerate import Accelerator
    from stacks import texts

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data import tokenize_records
    from crma.engine import LoraSettings
    from crma.methods.frozen import Frozen
    from crma.model import base_model_id, load_base
    from crma.train import TrainConfig

    steps = []

    def nan_at_step_4(self, engine, batch, outputs):
        steps.append(1)
        return torch.tensor(float("nan")) if len(steps) == 4 else None

    def attempt(lr: float) -> None:
        spec = StackSpec("frozen", {}, LoraSettings(r=4, alpha=8), CRMAConfig())
        cm = ContinualModel.open_or_create(
            path, lambda: load_base(str(TINY_BASE)), base_model_id(str(TINY_BASE)), spec
        )
        examples = tokenize_records(
            [{"text": t} for t in texts("medic", 40, 0)], cm.engine.tokenizer, 32
        )
        cfg = TrainConfig(lr=lr, max_steps=6, max_length=32, checkpoint_every=3, precision="fp32")
        cm.add_domain("medic", examples, cfg, Accelerator(cpu=True), 0, path / "metrics.jsonl", {})

    path = tmp_path / "s"
    monkeypatch.setattr(Frozen, "extra_loss", nan_at_step_4)
    message = "domain 'medic': non-finite loss at step 4; nothing was committed (the checkpoint at step 3 is kept)"
    with pytest.raises(UserError, match=re.escape(message)):
        attempt(lr=0.03)
    assert not Stack.exists(path) and (path / "checkpoint" / "state.safetensors").is_file()
    text = (path / "metrics.jsonl").read_text()
    assert "NaN" not in text and [json.loads(line)["step"] for line in text.splitlines()] == [
        1,
        2,
        3,
    ]
    monkeypatch.undo()
    attempt(lr=0.01)
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert Stack.open(path).domains == ["medic"] and not (path / "checkpoint").exists()


def test_every_committed_file_truncated_corrupted_or_missing_is_named(tmp_path):
    """Each file the manifest lists, damaged three ways: `crma check` names that very file,
    and opening the stack (sizes, and hashes on a stack this small) refuses it too."""
    clean = tmp_path / "clean"
    build_stack(clean, ["medic", "money"], steps=2)
    files = sorted(json.loads((clean / "manifest.json").read_text())["files"])
    assert len(files) >= 7  # two adapters (config + weights), backbone + config, router

    def truncate(f):
        f.write_bytes(f.read_bytes()[:-1])

    def flip(f):
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))

    detected = []
    for rel in files:
        for damage in (truncate, flip, lambda f: f.unlink()):
            stack = tmp_path / "damaged"
            shutil.rmtree(stack, ignore_errors=True)
            shutil.copytree(clean, stack)
            damage(stack / rel)
            for check in (check_stack, Stack.open):
                with pytest.raises(UserError) as caught:
                    check(stack)
                detected.append(str(stack / rel) in str(caught.value))
    assert all(detected) and len(detected) == len(files) * 3 * 2
