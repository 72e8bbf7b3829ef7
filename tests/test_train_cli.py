"""`crma train`: create a stack, continue it later, refuse what would corrupt it."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from helpers import (
    ROOT,
    TINY_BASE,
    TINY_DATA,
    adapter_file,
    committed,
    crma_cmd,
    crma_env,
    run_crma,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from crma.integrity import check_stack

FAST = [
    "--max-steps",
    "4",
    "--max-length",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "0.03",
    "--lora-r",
    "4",
]


def train(stack, *domains, method="crma", base=TINY_BASE, check=True, extra=()):
    args = ["train", str(stack), "--base", str(base), "--method", method, *FAST, *extra]
    for d in domains:
        args += ["--domain", f"{d}={TINY_DATA / f'{d}.train.jsonl'}"]
    return run_crma(*args, check=check)


@pytest.mark.integration
def test_second_call_adds_a_domain_and_keeps_earlier_adapters(tmp_path):
    stack = tmp_path / "stack"
    train(stack, "alpha")
    alpha = stack / "adapters" / "alpha" / "adapter_model.safetensors"
    before = alpha.read_bytes()
    backbone_before = committed(stack, "backbone").read_bytes()
    train(stack, "beta")
    assert adapter_file(stack, "alpha") == alpha and alpha.read_bytes() == before
    assert committed(stack, "backbone").read_bytes() != backbone_before, "backbone keeps training"
    manifest = json.loads((stack / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["alpha", "beta"]
    assert manifest["method"] == "crma" and manifest["base_model"]["sha256"]
    assert all(d["steps"] == 4 and len(d["train_sha256"]) == 64 for d in manifest["domains"])
    assert not (stack / "checkpoint").exists()


@pytest.mark.integration
def test_duplicate_domain_and_other_base_are_refused(tmp_path):
    stack = tmp_path / "stack"
    train(stack, "alpha")
    manifest = (stack / "manifest.json").read_bytes()
    proc = train(stack, "alpha")  # the same command again (after a kill): nothing to do
    assert "already trained" in proc.stdout and (stack / "manifest.json").read_bytes() == manifest
    proc = train(stack, "alpha", check=False, extra=["--seed", "1"])
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--replace" in proc.stderr

    other = tmp_path / "other-base"
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((TINY_BASE / name).read_bytes())
    proc = train(stack, "beta", base=other, check=False)
    assert proc.returncode == 2 and "stack was trained on base" in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.integration
def test_replace_retrains_a_domain(tmp_path):
    stack = tmp_path / "stack"
    train(stack, "alpha", method="frozen")
    before = adapter_file(stack, "alpha").read_bytes()
    train(stack, "alpha", method="frozen", extra=["--replace", "--seed", "1"])
    assert adapter_file(stack, "alpha").read_bytes() != before
    # Same seed again: a fresh adapter retrained from scratch reproduces the first one exactly.
    train(stack, "alpha", method="frozen", extra=["--replace"])
    assert adapter_file(stack, "alpha").read_bytes() == before
    manifest = json.loads((stack / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["alpha"]


@pytest.mark.integration
def test_adapters_load_with_plain_peft(tmp_path):
    stack = tmp_path / "stack"
    train(stack, "alpha", "beta", method="frozen")
    base = AutoModelForCausalLM.from_pretrained(TINY_BASE)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(stack / "adapters" / "alpha"))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-4, "the trained adapter changes the output"


@pytest.mark.integration
def test_bad_domain_argument_fails_clearly(tmp_path):
    proc = run_crma(
        "train", str(tmp_path / "s"), "--base", str(TINY_BASE), "--domain", "alpha", check=False
    )
    assert proc.returncode == 2 and "NAME=FILE" in proc.stderr
    proc = run_crma(
        "train",
        str(tmp_path / "s"),
        "--base",
        str(TINY_BASE),
        "--domain",
        "a=/no/file",
        check=False,
    )
    assert proc.returncode == 2 and "/no/file" in proc.stderr


@pytest.mark.integration
def test_method_options_are_stored_checked_and_fixed(tmp_path):
    stack = tmp_path / "stack"
    proc = train(stack, "alpha", method="ewc", check=False, extra=["--option", "lamda=3"])
    assert (
        proc.returncode == 2
        and "unknown key 'lamda'" in proc.stderr
        and "ewc_lambda" in proc.stderr
    )
    assert not stack.exists(), "a rejected option leaves no stack behind"
    train(stack, "alpha", method="ewc", extra=["--option", "ewc_lambda=3"])
    assert json.loads((stack / "manifest.json").read_text())["configs"]["method_options"] == {
        "ewc_lambda": 3
    }
    proc = train(stack, "beta", method="ewc", check=False, extra=["--option", "ewc_lambda=4"])
    assert proc.returncode == 2 and "fixed when a stack is created" in proc.stderr


@pytest.mark.integration
def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    """Two `crma train` on one stack: the second is refused at once, naming the first; the
    first killed (SIGKILL, no cleanup), the next writer takes the stack over and commits."""
    stack = tmp_path / "stack"
    args = ["train", str(stack), "--base", str(TINY_BASE), *FAST, "--max-steps", "100000"]
    first = subprocess.Popen(
        crma_cmd(*args, "--domain", f"alpha={TINY_DATA / 'alpha.train.jsonl'}"),
        cwd=ROOT, env=crma_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lock = stack / "writer.lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.is_file() and lock.read_text()):
        time.sleep(0.05)
    try:
        proc = train(stack, "beta", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert f"another crma process is writing here (pid {first.pid} " in proc.stderr
        assert "`crma train " in proc.stderr and "since 20" in proc.stderr
    finally:
        first.kill()
        first.wait()
    train(stack, "beta")
    assert json.loads((stack / "manifest.json").read_text())["domains"][0]["name"] == "beta"
    assert check_stack(stack)[-1].startswith("adapter    adapters/beta")


@pytest.mark.integration
def test_route_examples_are_stored_for_their_domain_and_route_prompts_of_their_style(tmp_path):
    from crma.data import load_records
    from crma.generate import load_stack

    gamma = TINY_DATA / "gamma.train.jsonl"
    prompts = [r["text"] for r in load_records(TINY_DATA / "gamma.holdout.jsonl")]
    for owner in ("alpha", "beta"):  # the same data but the route examples' owner
        stack = tmp_path / owner
        extra = ["--route-examples", f"{owner}={gamma}"]
        train(stack, "alpha", "beta", method="frozen", extra=extra)
        manifest = json.loads((stack / "manifest.json").read_text())
        assert manifest["router"]["route_examples"] == {owner: 48}
        routes = load_stack(stack).route(prompts)
        assert [r.domain for r in routes] == [owner] * len(prompts)
        again = train(stack, "alpha", "beta", method="frozen", extra=extra)
        assert "alpha, beta: already trained" in again.stdout
    other = ["--route-examples", f"beta={TINY_DATA / 'alpha.holdout.jsonl'}"]
    proc = train(stack, "beta", method="frozen", check=False, extra=other)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--replace" in proc.stderr
