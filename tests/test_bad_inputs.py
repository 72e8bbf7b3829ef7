"""Bad input, one table: every case exits 2 with one line naming the problem, no traceback,
and leaves no new or changed file (README, "Errors").

Cases run `crma` in this process (`crma.cli.main`) against a workspace holding data files, a
committed tiny stack `S` and a config; damaged-stack cases damage a copy of `S` first.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from helpers import TINY_BASE, TINY_CONFIG, TINY_DATA, committed
from stacks import build_stack

from crma.cli import main
from crma.lock import WriterLock

TRAIN = ["train", "{ws}/new", "--base", str(TINY_BASE), "--domain", "alpha={ws}/f.jsonl"]
GEN = ["generate", "{ws}/S", "hello"]
RUN = ["run", str(TINY_CONFIG), "--out", "{ws}/run"]
STREAM = ["stream", "{ws}/S", "--input", "{ws}/f.jsonl"]
CLEAN = ["data", "clean", "{ws}/f.jsonl", "--out", "{ws}/clean.jsonl"]


def damaged(edit: Callable[[Path], None]) -> Callable[[Path], Iterator[None]]:
    """A case's preparation: a copy of S (at ws/D), damaged by `edit`."""

    @contextmanager
    def prepare(ws: Path) -> Iterator[None]:
        shutil.rmtree(ws / "D", ignore_errors=True)
        shutil.copytree(ws / "S", ws / "D")
        edit(ws / "D")
        yield

    return prepare


@contextmanager
def busy(ws: Path) -> Iterator[None]:
    with WriterLock(ws / "S"):
        yield


def truncate(stack: Path) -> None:
    adapter = stack / "adapters" / "medic" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])


def flip_router_byte(stack: Path) -> None:
    router = committed(stack, "router")
    data = bytearray(router.read_bytes())
    data[len(data) // 2] ^= 0xFF
    router.write_bytes(bytes(data))


def remove_backbone(stack: Path) -> None:
    committed(stack, "backbone").unlink()


def foreign_adapter(stack: Path) -> None:
    """Another stack's adapter of the same shape, put in place of medic's."""
    money = stack / "adapters" / "money" / "adapter_model.safetensors"
    shutil.copy(money, stack / "adapters" / "medic" / "adapter_model.safetensors")


def manifest_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(stack: Path) -> None:
        manifest = json.loads((stack / "manifest.json").read_text())
        change(manifest)
        (stack / "manifest.json").write_text(json.dumps(manifest))

    return edit


def no_serving_router(stack: Path) -> None:
    """The router as crma wrote it before serving routers existed."""
    manifest_edit(lambda m: m["router"].pop("serving"))(stack)


def break_manifest(stack: Path) -> None:
    (stack / "manifest.json").write_text('{"format": 2, "domains": [')


def future_stream_log(stack: Path) -> None:
    """A stream log whose start event holds a setting this crma does not know."""
    start = {"event": "start", "input": "f.jsonl", "train": {"from_a_newer_crma": 1}}
    (stack / "stream.jsonl").write_text(json.dumps(start) + "\n")


CASES = [
    # crma train: the issue's rows, then every other kind of setting and argument
    (TRAIN + ["--max-steps", "-3"], "--max-steps: expected an integer >= 1, got -3"),
    (TRAIN + ["--lr", "nan", "--max-steps", "1"], "--lr: expected a finite number > 0, got nan"),
    (TRAIN + ["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (TRAIN + ["--lora-r", "-1"], "--lora-r: expected an integer >= 1, got -1"),
    (TRAIN + ["--crma-n-streams", "0"], "--crma-n-streams: expected an integer >= 1, got 0"),
    (TRAIN + ["--epochs", "0"], "--epochs: expected a finite number > 0, got 0.0"),
    (TRAIN + ["--lr", "0"], "--lr: expected a finite number > 0, got 0.0"),
    (TRAIN + ["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    (TRAIN + ["--lora-dropout", "1"], "--lora-dropout: expected a finite number in [0, 1)"),
    (TRAIN + ["--grad-accum", "9"], "--grad-accum: expected at most batch_size (8), got 9"),
    (TRAIN + ["--gradient-checkpointing", "maybe"], "argument --gradient-checkpointing: expected true/false"),
    (TRAIN + ["--fsdp", "sometimes"], "argument --fsdp: expected true/false"),
    (TRAIN + ["--fsdp", "true"], "train.fsdp: shards the base over several processes; launch with torchrun"),
    (TRAIN + ["--fsdp", "true", "--method", "osf"], "train.fsdp: method 'osf' merges its adapters into the base weights"),
    (TRAIN + ["--deepspeed", "1"], "--deepspeed: expected 0 (off), 2 or 3, got 1"),
    (TRAIN + ["--deepspeed", "3"], "train.deepspeed: shards over several processes; launch with torchrun"),
    (TRAIN + ["--deepspeed", "3", "--gradient-checkpointing", "true"], "train.gradient_checkpointing: ZeRO-3 frees the base weights that recomputation needs"),
    (TRAIN + ["--deepspeed", "two"], "argument --deepspeed: invalid int value: 'two'"),
    (TRAIN + ["--deepspeed", "2"], "train.deepspeed: shards over several processes; launch with torchrun"),
    (TRAIN + ["--deepspeed", "2", "--fsdp", "true"], "--deepspeed: expected 0 when train.fsdp is true, got 2"),
    (TRAIN + ["--load-in-4bit"], "--load-in-4bit: bitsandbytes quantization needs a CUDA GPU; this machine has none"),
    (TRAIN + ["--load-in-8bit"], "--load-in-8bit: bitsandbytes quantization needs a CUDA GPU; this machine has none"),
    (TRAIN + ["--load-in-4bit", "--load-in-8bit"], "argument --load-in-8bit: not allowed with argument --load-in-4bit"),
    (["train", "{ws}/new", "--base", "{ws}/m.gguf", "--load-in-4bit", "--domain", "a={ws}/f.jsonl"], "m.gguf is a GGUF file (dequantized to float on load)"),
    (TRAIN + ["--warmup-ratio", "1.5"], "--warmup-ratio: expected a finite number in [0, 1)"),
    (TRAIN + ["--max-length", "1"], "--max-length: expected an integer >= 2, got 1"),
    (TRAIN + ["--crma-temperature", "0"], "--crma-temperature: expected a finite number > 0"),
    (TRAIN + ["--crma-lr-mix", "-1"], "--crma-lr-mix: expected a finite number > 0"),
    (TRAIN + ["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (TRAIN + ["--max-steps", "ten"], "argument --max-steps: invalid int value: 'ten'"),
    (TRAIN + ["--zclip", "maybe"], "argument --zclip: expected true/false, got 'maybe'"),
    (TRAIN + ["--crma-n-streams", "1000"], "crma.n_streams: expected at most 64 (the model's"),
    (TRAIN + ["--lora-target-modules", "qproj"], "lora.target_modules: no module 'qproj'"),
    (TRAIN + ["--lora-target-modules", " "], "--lora-target-modules: expected a list, each item a module name"),
    (TRAIN + ["--method", "ewc", "--option", "ewc_lambda=-1"], "ewc_lambda: expected a finite number >= 0, got -1"),
    (TRAIN + ["--method", "ewc", "--option", "lamda=3"], "unknown key 'lamda'; known keys: ewc_lambda"),
    (TRAIN + ["--option", "noequals"], "--option 'noequals': expected KEY=VALUE"),
    (TRAIN + ["--method", "sgd"], "argument --method: invalid choice: 'sgd'"),
    (TRAIN + ["--domain", "beta"], "--domain 'beta': expected NAME=FILE"),
    (TRAIN + ["--domain", "beta={ws}/missing.jsonl"], "missing.jsonl not found"),
    (TRAIN + ["--domain", "../up={ws}/f.jsonl"], "domain name '../up': expected a name of letters"),
    (TRAIN + ["--domain", "auto={ws}/f.jsonl"], "domain name 'auto'"),
    (TRAIN + ["--domain", "Alpha={ws}/f.jsonl"], "'Alpha' and 'alpha' differ only in case"),
    (TRAIN + ["--domain", "x" * 65 + "={ws}/f.jsonl"], "(up to 64"),
    (["train", "{ws}/new", "--base", "{ws}/no-model", "--domain", "a={ws}/f.jsonl"], "no-model: model folder not found"),
    # data files
    (TRAIN + ["--domain", "e={ws}/empty.jsonl"], "empty.jsonl"),
    (TRAIN + ["--route-examples", "alpha"], "--route-examples 'alpha': expected NAME=FILE"),
    (TRAIN + ["--route-examples", "alpha={ws}/missing.jsonl"], "missing.jsonl not found"),
    (TRAIN + ["--route-examples", "beta={ws}/f.jsonl"], "no --domain beta in this command"),
    (TRAIN + ["--route-examples", "alpha={ws}/f.jsonl", "--route-examples", "Alpha={ws}/f.jsonl"], "'Alpha' and 'alpha' differ only in case"),
    (TRAIN + ["--route-examples", "alpha={ws}/empty.jsonl"], "empty.jsonl:1: file is empty"),
    (TRAIN + ["--route-examples", "alpha={ws}/broken.jsonl"], "broken.jsonl:2: invalid JSON"),
    (TRAIN + ["--domain", "e={ws}/broken.jsonl"], "broken.jsonl:2: invalid JSON"),
    (TRAIN + ["--domain", "e={ws}/latin1.jsonl"], "latin1.jsonl"),
    (TRAIN + ["--domain", "e={ws}/nofields.jsonl"], "nofields.jsonl:1"),
    # an existing stack
    (["train", "{ws}/S", "--base", str(TINY_BASE), "--method", "frozen", "--domain", "a={ws}/f.jsonl"], "stack uses method 'crma', not 'frozen'"),
    (["train", "{ws}/S", "--base", str(TINY_BASE), "--domain", "medic={ws}/f.jsonl"], "domain 'medic' already exists"),
    (["train", "{ws}/S", "--base", str(TINY_BASE), "--domain", "Medic={ws}/f.jsonl"], "'Medic' and 'medic' differ only in case"),
    (["train", "{ws}/S", "--base", str(TINY_BASE), "--domain", "a={ws}/f.jsonl"], "another crma process is writing here (pid", busy),
    (["train", "{ws}/foreign", "--base", str(TINY_BASE), "--domain", "a={ws}/f.jsonl"], "exists and is not a crma stack (it holds 'notes.txt')"),
    # crma run and its configs
    (["run", "{ws}/missing.yaml"], "missing.yaml: config file not found"),
    (["run", "{ws}/bad.yaml", "--out", "{ws}/run"], "bad.yaml:3: invalid YAML"),
    (RUN + ["--set", "train.max_steps=-3"], "tiny.yaml: train: max_steps: expected an integer >= 1, got -3"),
    (RUN + ["--set", "train.lr=.nan"], "train: lr: expected a finite number > 0, got nan"),
    (RUN + ["--set", "load_in=4bit"], "load_in: 4bit: bitsandbytes quantization needs a CUDA GPU"),
    (RUN + ["--set", "load_in=2bit"], "load_in: expected one of"),
    (RUN + ["--set", "train.gradient_checkpointing=sometimes"], "train: gradient_checkpointing: expected"),
    (RUN + ["--set", "train.fsdp=true"], "train.fsdp: shards the base over several processes; launch with torchrun"),
    (RUN + ["--set", "train.fsdp=true", "--set", "methods=[osf]"], "train.fsdp: method 'osf' merges its adapters"),
    (RUN + ["--set", "train.deepspeed=1"], "train: deepspeed: expected 0 (off), 2 or 3, got 1"),
    (RUN + ["--set", "train.deepspeed=3", "--set", "train.gradient_checkpointing=true"], "train.gradient_checkpointing: ZeRO-3 frees the base weights that recomputation needs"),
    (RUN + ["--set", "train.deepspeed=2"], "train.deepspeed: shards over several processes; launch with torchrun"),
    (RUN + ["--set", "seeds=[-1]"], "seeds: expected a list, each item an integer in [0, 4294967296), got -1"),
    (RUN + ["--set", "methods=[sgd]"], "methods[0]: name: expected one of naive, frozen"),
    (RUN + ["--set", "methods=[{name: crma, label: ../x}]"], "methods[0]: label: expected a name of letters"),
    (RUN + ["--set", "eval.routers=[oracle]"], "eval: routers: expected a list, each item one of centroid, fast, arrow, loss"),
    (RUN + ["--set", "eval.route_questions=-1"], "eval: route_questions"),
    (["run", "configs/long.yaml", "--out", "{ws}/run", "--set", "eval.qa=true", "--set", "eval.qa_mmlu=299", "--set", "eval.route_questions=10"], "eval.qa_mmlu=299 scores; use a divisor of 300"),
    (RUN + ["--set", "corpus.split=test"], "corpus: split: expected one of holdout, validation, got 'test'"),
    (RUN + ["--set", "nosuchkey=1"], "unknown key 'nosuchkey'"),
    (RUN + ["--only", "ewc"], "tiny.yaml; its conditions: naive, frozen, crma"),
    (RUN + ["--set", "train.lr=fast"], "train: lr: expected a finite number > 0, got 'fast'"),
    (RUN + ["--set", "methods=[{name: crma, crma: {variant: loose}}]"], "methods[crma].crma: variant: expected one of untied, tied, got 'loose'"),
    (RUN + ["--set", "methods=[{name: ewc, options: {ewc_lambda: -1}}]"], "methods[ewc] options: ewc_lambda: expected a finite number >= 0, got -1"),
    (RUN + ["--set", "methods=[{name: replay, options: {buffer: 50}}]"], "methods[replay] options: unknown key 'buffer'"),
    (RUN + ["--set", "domains=[{name: a, train: x.jsonl, holdout: y.jsonl}]"], "domains: list at least two domains"),
    (RUN + ["--set", "train=5"], "train: expected a mapping of settings, got 5"),
    (RUN + ["--set", "crma.n_streams=1000"], "crma.n_streams: expected at most 64"),
    (RUN + ["--set", "lora.target_modules=[qproj]"], "lora.target_modules: no module 'qproj'"),
    (RUN + ["--set", "domains=[{name: a, train: x.jsonl, holdout: y.jsonl}, {name: a, train: x.jsonl, holdout: y.jsonl}]"], "domains: every name once"),
    (RUN + ["--set", "domains.0.name=x"], "--set 'domains.0.name=x': domains is not a section"),
    (RUN + ["--set", "domains=[{name: a, train: {ws}/missing.jsonl, holdout: {ws}/f.jsonl}, {name: b, train: {ws}/f.jsonl, holdout: {ws}/f.jsonl}]"], "missing.jsonl: file not found"),
    (["run", str(TINY_CONFIG), "--out", "{ws}/S", "--set", "train.lr=0.5"], "exists and is not a crma run directory"),
    # generate, chat's settings, eval
    (GEN[:2] + [""], "prompt is empty"),
    (GEN + ["--domain", "nope"], "no domain 'nope'; the stack has: medic, money"),
    (GEN + ["--temperature", "-1"], "--temperature: expected a finite number >= 0, got -1.0"),
    (GEN + ["--top-p", "0"], "--top-p: expected a finite number in (0, 1], got 0.0"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (GEN + ["--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens: expected at most max_new_tokens (4), got 9"),
    (GEN + ["--threshold", "2"], "--threshold: expected a finite number in [0, 1], got 2.0"),
    (GEN + ["--router", "oracle"], "argument --router: invalid choice: 'oracle'"),
    (["generate", "{ws}/D", "hi", "--router", "fast"], "--router fast needs the stack's serving router", damaged(no_serving_router)),
    (["serve", "{ws}/D", "--router", "fast"], "--router fast needs the stack's serving router", damaged(no_serving_router)),
    (["generate", "{ws}/nothing", "hi"], "nothing: not a crma stack (no manifest.json)"),
    (["eval", "{ws}/S", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["eval", "{ws}/S", "--probes", "nope={ws}/f.jsonl"], "the stack has no domain 'nope'"),
    (["eval"], "give a STACK to evaluate, or --base-only"),
    (["eval", "--base-only", "--probes", "a={ws}/f.jsonl"], "--probes: only with a stack"),
    (["eval", "--base-only", "--mmlu-order", "last"], "argument --mmlu-order: invalid choice: 'last'"),
    # tune, report
    (["tune", "{ws}/missing.yaml"], "missing.yaml: grid file not found"),
    (["tune", "{ws}/bad.yaml"], "bad.yaml:3: invalid YAML"),
    (["tune", "{ws}/nogrid.yaml"], "needs `config` and exactly one of `axes` (with `methods`), `grid`, `points`"),
    (["tune", "{ws}/badgrid.yaml"], "badgrid.yaml: " + str(TINY_CONFIG) + ": train: lr: expected a finite number > 0, got -1"),
    (["report", "{ws}", "--out", "{ws}/o"], "--out: only with --costs"),
    (["report", "{ws}", "--before-note", "v1"], "--before-note: only with --costs"),
    (["report", "{ws}", "--costs", "{ws}/f.jsonl"], "f.jsonl: invalid JSON"),
    (["report", "{ws}", "--costs", "{ws}/missing.json"], "missing.json: no such cost file"),
    # data tools, export
    (CLEAN + ["--min-alpha", "2"], "--min-alpha: expected a finite number in [0, 1], got 2.0"),
    (CLEAN + ["--min-chars", "50", "--max-chars", "10"], "--min-chars: expected at most max_chars (10), got 50"),
    (CLEAN + ["--language", "fr"], "argument --language: invalid choice: 'fr'"),
    (["data", "clean", "{ws}/missing.jsonl", "--out", "{ws}/o.jsonl"], "missing.jsonl"),
    (["data", "check", "{ws}/f.jsonl", "{ws}/f.jsonl", "--threshold", "1.5"], "--threshold: expected a finite number in [0, 1], got 1.5"),
    (["export", "{ws}/nothing", "{ws}/dest"], "not a run directory (no config.yaml)"),
    # segment and stream
    (["segment", "{ws}/missing.jsonl"], "missing.jsonl: file not found"),
    (["segment", "{ws}/broken.jsonl"], "broken.jsonl:2: invalid JSON"),
    (["segment", "{ws}/f.jsonl", "--window", "30"], "--window: expected at most lookahead (20), got 30"),
    (["segment", "{ws}/f.jsonl", "--identify-docs", "1"], "--identify-docs: expected an integer >= 2, got 1"),
    (["segment", "{ws}/f.jsonl", "--confirm-docs", "25"], "--confirm-docs: expected at most lookahead (20), got 25"),
    (["segment", "{ws}/f.jsonl", "--confirm", "0"], "--confirm: expected a finite number > 0, got 0.0"),
    (["segment", "{ws}/f.jsonl", "--known-band", "-0.5"], "--known-band: expected a finite number >= 0, got -0.5"),
    (["segment", "{ws}/f.jsonl", "--stack", "{ws}/nothing"], "nothing: not a crma stack (no manifest.json)"),
    (STREAM + ["--names", "medic"], "--names: the stack already has a domain 'medic'"),
    (STREAM + ["--names", "a,A"], "--names: 'A' and 'a' differ only in case"),
    (STREAM + ["--names", "../x"], "domain name '../x': expected a name of letters"),
    (STREAM + ["--min-segment", "0"], "--min-segment: expected an integer >= 1, got 0"),
    (["stream", "{ws}/S", "--input", "-"], "--input -: crma stream rereads its input"),
    (["stream", "{ws}/new", "--input", "{ws}/nofields.jsonl"], "nofields.jsonl:1"),
    (["stream", "{ws}/foreign", "--input", "{ws}/f.jsonl"], "exists and is not a crma stack"),
    (STREAM, "another crma process is writing here (pid", busy),
    (["stream", "{ws}/D", "--input", "{ws}/f.jsonl", "--base", str(TINY_BASE)], "stream.jsonl:1: start event: train: unknown key 'from_a_newer_crma'", damaged(future_stream_log)),
    # damaged stacks: opened by generate (sizes and, on small stacks, hashes) or by crma check
    (["generate", "{ws}/D", "hi"], "adapter_model.safetensors: 100 bytes, the manifest recorded", damaged(truncate)),
    (["generate", "{ws}/D", "hi"], "sha256 differs from the manifest's", damaged(flip_router_byte)),
    (["check", "{ws}/D"], "sha256 differs from the manifest's", damaged(flip_router_byte)),
    (["check", "{ws}/D"], ".safetensors: missing; the stack is damaged", damaged(remove_backbone)),
    (["check", "{ws}/D"], "medic/adapter_model.safetensors: sha256 differs", damaged(foreign_adapter)),
    (["generate", "{ws}/D", "hi"], "manifest.json: not valid JSON", damaged(break_manifest)),
    (["check", "{ws}/D"], "stack format 3; this crma reads formats 1 and 2", damaged(manifest_edit(lambda m: m.update(format=3)))),
    (["check", "{ws}/D"], "missing or malformed field", damaged(manifest_edit(lambda m: m["adapters"].clear()))),
]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad")
    rows = (TINY_DATA / "alpha.train.jsonl").read_text().splitlines()
    (ws / "f.jsonl").write_text("\n".join((rows * 2)[:64]) + "\n")  # 64 plain-text rows
    (ws / "empty.jsonl").write_text("")
    (ws / "broken.jsonl").write_text(rows[0] + '\n{"text": "no end\n')
    (ws / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (ws / "nofields.jsonl").write_text('{"title": "x"}\n')
    (ws / "bad.yaml").write_text("methods: [crma]\nseeds: [0\n")
    (ws / "nogrid.yaml").write_text(f"config: {TINY_CONFIG}\n")
    (ws / "badgrid.yaml").write_text(f"config: {TINY_CONFIG}\npoints: [{{train.lr: -1}}]\n")
    (ws / "foreign").mkdir()
    (ws / "foreign" / "notes.txt").write_text("mine")
    build_stack(ws / "S", ["medic", "money"], steps=2)
    return ws


@pytest.mark.parametrize(
    "argv, fragment, prepare",
    [case if len(case) == 3 else (*case, None) for case in CASES],
    ids=[f"{i:02d}-{case[0][0]}" for i, case in enumerate(CASES)],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(workspace, argv, fragment, prepare):
    ws = workspace
    with (prepare or (lambda _ws: nullcontext()))(ws):
        before = snapshot(ws)
        code, out, err = crma(*(a.replace("{ws}", str(ws)) for a in argv))
        assert snapshot(ws) == before, "no file may be created or changed"
    assert code == 2, (out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("crma: error: "), err
    assert fragment in err, err


def test_the_table_covers_every_command_and_the_issue_rows():
    assert len(CASES) >= 40
    commands = {case[0][0] for case in CASES}
    assert commands >= {
        "train", "run", "generate", "eval", "data", "export", "check", "tune", "segment", "stream"
    }  # fmt: skip
    assert "report" in commands


def crma(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under `root`."""
    return {
        p.relative_to(root).as_posix(): (
            p.stat().st_size if p.is_file() else -1,
            p.stat().st_mtime_ns,
        )
        for p in root.rglob("*")
    }
