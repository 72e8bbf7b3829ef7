"""Data parallel for real: two processes started by torchrun (gloo on CPU) against one process.

Two processes on a global batch of 8 train each on 4 examples and DDP averages the gradients;
the trainer scales each process's loss so that this equals one process on all 8 (crma.train).
With train.fsdp the two processes also shard the frozen base with FSDP2 (crma.fsdp) and
average the replicated adapters' and backbone's gradients themselves: the same equality.
With train.deepspeed: 2 DeepSpeed ZeRO-2 shards AdamW's state and the gradients (crma.zero),
here with two micro-batches per process (DeepSpeed's accumulation): the same equality again;
with train.deepspeed: 3 ZeRO-3 also partitions the base while steps run, and gathers it back
for evaluation and commits: the same equality once more (ZeRO runs need
`pip install 'crma[distributed]'`, else they skip).
What differs is only the order of float32 reductions (padding to each shard's own longest
example, the all-reduce), a few 1e-7 per step; the tolerance 1e-4 leaves two decades for the
growth over the run. At the tiny config's lr 0.03 naive's third domain amplifies that noise to
5e-4 (one process with two micro-batches does the same, see the accumulation test), so these
runs use lr 0.003.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT, TINY_CONFIG, adapter_file, committed, crma_cmd, crma_env, kill_harness
from safetensors import safe_open
from safetensors.torch import load_file

TOLERANCE = 1e-4
DATA_PARALLEL = [
    "naive",
    "frozen",
    "crma",
    "crma-task1",
    "ewc",
    "replay",
    "olora",
    "inflora",
    "osf",
]
# The methods each two-process launch trains: OSF merges into the base, which FSDP shards,
# and projects its factors in place after each step, which ZeRO's fp32 copy would undo.
LAUNCHES = {
    "ddp": DATA_PARALLEL,
    "fsdp": [m for m in DATA_PARALLEL if m != "osf"],
    "zero2": [m for m in DATA_PARALLEL if m != "osf"],
    "zero3": [m for m in DATA_PARALLEL if m != "osf"],
}
ZERO_STAGE = {"zero2": 2, "zero3": 3}
NEEDS_DEEPSPEED = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'crma[distributed]')",
)


def launch_params(pairs):
    """pytest params of (kind, ...) tuples; ZeRO ones skip without deepspeed."""
    return [pytest.param(*p, marks=NEEDS_DEEPSPEED if p[0] in ZERO_STAGE else ()) for p in pairs]


DOMAINS = ["alpha", "beta", "gamma"]
STEPS = 8


def torchrun() -> list[str]:
    """Two local processes; --standalone picks a free rendezvous port (tests run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` to success; a collective one process never joins fails it, not hangs it."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=crma_env(), capture_output=True, text=True, timeout=900
    )
    errors = [line for line in proc.stderr.splitlines() if "crma: error:" in line]
    assert proc.returncode == 0, "\n".join([*errors, proc.stderr[-3000:]])  # each rank's error
    return proc


def config(tmp_path, methods: list[str], kind: str = "ddp"):
    """The tiny protocol for `methods`, trained as `kind` says (ddp, fsdp, zero2 or zero3)."""
    data = yaml.safe_load(TINY_CONFIG.read_text())
    data["methods"] = methods
    data["train"] |= {"lr": 0.003, "max_steps": STEPS, "checkpoint_every": 3}
    data["train"] |= {"fsdp": kind == "fsdp", "deepspeed": ZERO_STAGE.get(kind, 0)}
    if kind in ZERO_STAGE:  # and DeepSpeed's accumulation: two micro-batches per process
        data["train"] |= {"grad_accum": 2}
    data["eval"] |= {"routing": True}  # forward passes on the main process alone
    path = tmp_path / f"{'-'.join(methods)}-{kind}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(kind)`: the same protocol run in one process and in two (a key of LAUNCHES), each
    made once, when a test first asks for it."""
    tmp = tmp_path_factory.mktemp("dist")
    made: dict[str, Path] = {}

    def run(kind: str) -> tuple[Path, Path]:
        if "one" not in made:
            made["one"] = tmp / "one"
            launch(crma_cmd("run", str(config(tmp, DATA_PARALLEL)), "--out", str(made["one"])))
        if kind not in made:
            made[kind] = tmp / kind
            cfg = config(tmp, LAUNCHES[kind], kind)
            launch([*torchrun(), "-m", "crma", "run", str(cfg), "--out", str(made[kind])])
        return made["one"], made[kind]

    return run


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # no such process (any more)
        return None


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    pids = (int(p.name) for p in Path("/proc").glob("[0-9]*"))
    return [c for c in pids if (fields := proc_stat(c)) and int(fields[1]) == pid]


def alive(pid: int) -> bool:
    """Not killed yet (a zombie was: its parent just has not reaped it)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def lock_free(directory: Path) -> bool:
    """Nobody holds `directory`'s writer lock."""
    from crma.errors import UserError
    from crma.lock import check_free

    try:
        check_free(directory)
    except UserError:
        return False
    return True


def unit(run, method):
    return run / method / "seed-0"


def weight_updates(method: str, tensors: dict) -> dict:
    """What an adapter file adds to the weights, per module.

    LoRA (every method but OSF): B·A, not the factors one by one. Adam scales each entry's
    step by its own gradient's size, so an entry of A whose gradient is still near zero (B
    starts at 0) takes a full step whichever sign reduction-order noise gives its gradient:
    on an AMD EPYC naive's A came out 1.7e-4 apart after 8 steps while B·A stayed 1.2e-5
    apart. (InfLoRA's A is an eigenbasis besides, defined up to sign and rotation.)
    OSF: U_low·diag(S_low)·V_low (the factors can trade scale among themselves;
    reduction-order noise moves them along that freedom by up to 6e-3 in one process with two
    micro-batches as in two processes).
    """
    if method == "osf":
        return {
            k: u
            @ (tensors[k.replace("U_low", "S_low")][:, None] * tensors[k.replace("U_low", "V_low")])
            for k, u in tensors.items()
            if k.endswith("U_low")
        }
    assert all("lora_A" in k or "lora_B" in k for k in tensors), sorted(tensors)[0]
    return {
        k: tensors[k.replace("lora_A", "lora_B")] @ a for k, a in tensors.items() if "lora_A" in k
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    "kind, method", launch_params((k, m) for k, methods in LAUNCHES.items() for m in methods)
)
@pytest.mark.integration
def test_two_processes_match_one(runs, kind, method):
    one, two = runs = runs(kind)
    for run, world in ((one, 1), (two, 2)):
        fsdp = kind == "fsdp" and world == 2
        zero = ZERO_STAGE.get(kind, 0) if world == 2 else 0
        manifest = json.loads((unit(run, method) / "stack" / "manifest.json").read_text())
        for entry in manifest["domains"]:
            assert entry["world_size"] == world
            assert len(entry["rank_examples"]) == world and min(entry["rank_examples"]) > 0
            assert sum(entry["rank_examples"]) >= STEPS * 8  # replay adds memory examples
            # measured in each process while it trained: it held half the base (ZeRO-3 keeps
            # tensors no larger than the adapters' and the backbone's whole: the norms)
            shares = entry["base_shares"]
            if zero == 3:
                assert len(shares) == 2 and all(0.5 < s < 0.52 for s in shares)
            else:
                assert shares == ([0.5, 0.5] if fsdp else None)
            assert entry["load_in"] == "float"
        lines = [json.loads(line) for line in (unit(run, method) / "metrics.jsonl").open()]
        assert len(lines) == len(DOMAINS) * STEPS, "one writer: no line twice"
        kinds = {(line["world_size"], line["fsdp"], line["deepspeed"]) for line in lines}
        assert kinds == {(world, fsdp, zero)}
    matrices = [
        json.loads((unit(r, method) / "loss_matrix.json").read_text())["loss_matrix"] for r in runs
    ]
    diffs = [abs(a - b) for ra, rb in zip(*matrices) for a, b in zip(ra, rb) if a is not None]
    assert max(diffs) <= TOLERANCE
    routing = [json.loads((unit(r, method) / "routing.json").read_text())["centroid"] for r in runs]
    assert routing[0]["routes"] == routing[1]["routes"]
    losses = [r["routed_final_loss"] for r in routing]
    assert max(abs(losses[0][d] - losses[1][d]) for d in DOMAINS) <= TOLERANCE
    stacks = [unit(r, method) / "stack" for r in runs]
    for domain in DOMAINS:
        adapters = [load_file(adapter_file(s, domain)) for s in stacks]
        assert max_diff(*(weight_updates(method, a) for a in adapters)) <= TOLERANCE, domain
        lora_b = [v for k, v in adapters[1].items() if "lora_B" in k]
        assert not lora_b or max(v.abs().max().item() for v in lora_b) > 1e-3, "it trained"
    if method.startswith("crma"):
        backbones = [load_file(committed(s, "backbone")) for s in stacks]
        assert max_diff(*backbones) <= TOLERANCE
        assert backbones[1]["write_weights"].abs().max() > 1e-4, "the backbone trained"


@pytest.mark.parametrize(
    "method, kind, error",
    [
        ("lwf", "ddp", "method 'lwf' would not give the same result on 2 processes"),
        ("osf", "fsdp", "train.fsdp: method 'osf' merges its adapters into the base weights"),
    ],
)
@pytest.mark.integration
def test_a_method_that_cannot_run_distributed_refuses(tmp_path, method, kind, error):
    cfg = config(tmp_path, [method], kind)
    proc = subprocess.run(
        [*torchrun(), "-m", "crma", "run", str(cfg), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        env=crma_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"crma: error: {error}" in proc.stderr
    assert not (tmp_path / "o" / method).exists()


@pytest.mark.parametrize("kind", launch_params((k,) for k in sorted(LAUNCHES)))
@pytest.mark.integration
def test_launcher_killed_mid_domain_resumes_to_the_same_result(runs, tmp_path, kind):
    """SIGKILL the launcher only: its workers die with it (no orphan keeps the lock), and
    the rerun resumes from the last checkpoint to the uninterrupted run's files."""
    out = tmp_path / "killed"
    cfg = config(tmp_path, ["crma"], kind)
    cmd = [*torchrun(), "-m", "crma", "run", str(cfg), "--out", str(out)]
    metrics = unit(out, "crma") / "metrics.jsonl"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=crma_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"domain": "beta"') >= 4:
            workers = children(proc.pid)
            proc.kill()
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -9, "the launcher should have been killed while training beta"
    assert len(workers) == 2
    # The kernel kills the workers at once, but a killed process holds its files until its
    # last thread has exited, which a loaded machine can take seconds to finish (CI once
    # reran while a dead worker's threads still held the lock): wait for both, bounded.
    stack = unit(out, "crma") / "stack"
    deadline = time.time() + 60
    while time.time() < deadline and (any(map(alive, workers)) or not lock_free(stack)):
        time.sleep(0.1)
    assert not any(map(alive, workers)), "a worker outlived its launcher"
    assert lock_free(stack) and lock_free(out), "a dead worker still holds a lock"
    assert (unit(out, "crma") / "stack" / "checkpoint").is_dir()
    launch(cmd)
    assert kill_harness().differences(unit(runs(kind)[1], "crma"), unit(out, "crma")) == []


@pytest.mark.parametrize(
    "levers",
    [
        pytest.param([], id="ddp"),
        pytest.param(
            ["--fsdp", "true", "--gradient-checkpointing", "true", "--grad-accum", "2"],
            id="fsdp-checkpointing-accumulation",
        ),
        pytest.param(["--deepspeed", "3", "--grad-accum", "2"], id="zero3", marks=NEEDS_DEEPSPEED),
    ],
)
@pytest.mark.integration
def test_crma_train_on_two_processes_matches_one(tmp_path, levers):
    train = [
        "train",
        "--base",
        str(ROOT / "tests/assets/tiny-llama"),
        "--domain",
        f"alpha={ROOT / 'tests/assets/tiny-domains/alpha.train.jsonl'}",
        "--domain",
        f"beta={ROOT / 'tests/assets/tiny-domains/beta.train.jsonl'}",
        *("--max-steps", "6", "--lr", "0.003", "--max-length", "32", "--lora-r", "4"),
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(crma_cmd(train[0], str(one), *train[1:]))
    launch([*torchrun(), "-m", "crma", train[0], str(two), *train[1:], *levers])
    for stack, world in ((one, 1), (two, 2)):
        entries = json.loads((stack / "manifest.json").read_text())["domains"]
        assert [e["world_size"] for e in entries] == [world, world]
        assert [sum(e["rank_examples"]) for e in entries] == [6 * 8, 6 * 8]
    for domain in ("alpha", "beta"):
        adapters = [load_file(adapter_file(s, domain)) for s in (one, two)]
        assert max_diff(*(weight_updates("crma", a) for a in adapters)) <= TOLERANCE
    backbones = [load_file(committed(s, "backbone")) for s in (one, two)]
    assert max_diff(*backbones) <= TOLERANCE


def test_accelerates_deepspeed_type_trains_with_its_zero_stage():
    """An accelerate launch with configs/accelerate/deepspeed-zero{2,3}.yaml (GPUs) trains with
    that ZeRO stage without train.deepspeed; OSF, stages that do not exist, and ZeRO-3 with
    gradient checkpointing refuse."""
    from accelerate.utils import DistributedType

    from crma import UserError
    from crma.distributed import refuse_unsupported
    from crma.methods import make_method
    from crma.zero import refuse_zero, zero_stage

    def launched(stage):
        plugin = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))
        kind = DistributedType.DEEPSPEED
        return SimpleNamespace(num_processes=2, distributed_type=kind, state=plugin)

    crma = make_method("crma")
    for stage in (2, 3):
        refuse_unsupported(crma, launched(stage))
        assert zero_stage(0, launched(stage)) == stage
        with pytest.raises(UserError, match=f"method 'osf' edits .* ZeRO-{stage}'s sharded copy"):
            refuse_unsupported(make_method("osf"), launched(stage))
    with pytest.raises(UserError, match="train.gradient_checkpointing: ZeRO-3 frees the base"):
        refuse_unsupported(crma, launched(3), checkpointing=True)  # the launch decides the stage
    refuse_unsupported(crma, launched(2), checkpointing=True)  # ZeRO-2 keeps the base whole
    with pytest.raises(UserError, match="train.deepspeed: ZeRO-1 is not supported by crma"):
        refuse_zero(1, crma, 2)
    ddp = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    assert zero_stage(0, ddp) == 0 and zero_stage(2, ddp) == 2 and zero_stage(3, ddp) == 3


def test_accelerates_fsdp_type_trains_sharded_and_refuses_osf():
    """An accelerate launch with configs/accelerate/fsdp2.yaml (GPUs) turns FSDP on without
    train.fsdp; OSF then refuses as it does with train.fsdp."""
    from accelerate.utils import DistributedType

    from crma import UserError
    from crma.distributed import refuse_unsupported, uses_fsdp
    from crma.methods import make_method

    accelerator = SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP)
    assert uses_fsdp(False, accelerator)
    refuse_unsupported(make_method("crma"), accelerator)
    with pytest.raises(UserError, match="train.fsdp: method 'osf' merges"):
        refuse_unsupported(make_method("osf"), accelerator)
    ddp = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    assert not uses_fsdp(False, ddp) and uses_fsdp(True, ddp)


CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads_and_names_only_launch_options(path):
    """accelerate's own loader reads it, and accelerate launch knows every plugin key (it
    copies unknown ones silently)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    options = vars(launch_command_parser().parse_args(["script.py"]))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section) or {}:
            assert key in options, f"{path.name}: {section}.{key} is not an accelerate option"
    expected = {"ddp": "MULTI_GPU", "qlora": "MULTI_GPU", "fsdp2": "FSDP", "qlora-fsdp2": "FSDP"}
    assert config.distributed_type.value == expected.get(path.stem, "DEEPSPEED")
    if config.fsdp_config:
        assert config.fsdp_config["fsdp_version"] == 2


def test_every_scale_out_config_is_there():
    names = {p.stem for p in CONFIGS}
    assert names == {"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3", "qlora", "qlora-fsdp2"}


def test_a_checkpoint_resumes_only_with_the_number_of_processes_that_made_it(tmp_path):
    """Each process's share of the domain is counted in the checkpoint: a checkpoint made by
    two processes restarts the domain in one (and the other way round)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tiny import tiny_model, tiny_tokenizer

    from crma.checkpoint import CHECKPOINT_FILE
    from crma.engine import Engine, LoraSettings
    from crma.methods import Task, make_method
    from crma.train import TrainConfig, Trainer

    data = [{"input_ids": list(range(5, 15)), "labels": list(range(5, 15))}] * 8
    engine = Engine(tiny_model(), tiny_tokenizer(), LoraSettings(r=2), backbone=None)
    trainer = Trainer(
        engine,
        make_method("naive"),
        TrainConfig(batch_size=4, max_steps=2),
        Accelerator(cpu=True),
        {},
    )
    task, ckpt, metrics = Task(0, "alpha", 0), tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    trainer.train_task(task, data, ckpt, metrics, resume_key="k")  # leaves its step-2 checkpoint
    restored = []
    trainer._restore = lambda *args: restored.append(1) or 2
    trainer.train_task(task, data, ckpt, metrics, resume_key="k")
    assert restored == [1], "same processes: resumed"
    tensors = load_file(ckpt / CHECKPOINT_FILE)
    with safe_open(str(ckpt / CHECKPOINT_FILE), "pt") as fh:
        state = json.loads(fh.metadata()["state"])
    save_file(
        tensors, str(ckpt / CHECKPOINT_FILE), {"state": json.dumps({**state, "world_size": 2})}
    )
    trainer.train_task(task, data, ckpt, metrics, resume_key="k")
    assert restored == [1], "made by two processes: restarted"
    assert len(metrics.read_text().splitlines()) == 2


def test_zero_without_deepspeed_says_what_to_install(monkeypatch):
    import torch

    from crma import UserError
    from crma.zero import ZeroOptimizer

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed fails
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match=r"needs the deepspeed package \(pip install 'crma\["):
        ZeroOptimizer(model, optimizer, grad_accum=1)
