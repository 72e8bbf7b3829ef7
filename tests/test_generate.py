"""Generation with a stack: Python API, CLI, unknown domains, mixed-domain batches."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import ROOT, crma_cmd, crma_env, run_crma
from stacks import build_stack, texts

from crma.batching import pad_id
from crma.errors import UserError
from crma.generate import GenerateSettings, load_stack, mixed_logits

DOMAINS = ["medic", "money", "code"]


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "stack"
    build_stack(path, DOMAINS)
    return path


@pytest.fixture(scope="module")
def model(stack_path):
    return load_stack(stack_path)


def test_mixed_domain_batch_equals_per_row_single_adapter(model):
    cm, tok = model.cm, model.tokenizer
    prompts = [texts("medic", 1, 5)[0], texts("money", 1, 5)[0], "def add", texts("code", 1, 5)[0]]
    domains = ["medic", "money", None, "code"]  # None: no adapter (base + backbone)
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id(tok))
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    mixed = mixed_logits(cm, ids, mask, domains)  # (B, T, V)
    worst = 0.0
    for b, (r, d) in enumerate(zip(rows, domains)):
        with torch.no_grad(), cm.engine.using(cm.method.eval_adapters(d) if d else None):
            single = cm.engine.model(input_ids=torch.tensor([r])).logits[0]  # (T_b, V)
        worst = max(worst, (mixed[b, : len(r)] - single).abs().max().item())
        if d is not None:  # the adapters really differ, so a wrong row would show
            with torch.no_grad(), cm.engine.using(None):
                plain = cm.engine.model(input_ids=torch.tensor([r])).logits[0]
            assert (plain - single).abs().max().item() > 1e-3
    assert worst < 1e-5


def test_generate_api_routes_and_batches(model):
    answer = model.generate(texts("money", 1, 7)[0], settings=GenerateSettings(max_new_tokens=5))
    assert answer.domain == "money" and 0 < answer.confidence <= 1 and answer.new_tokens <= 5
    given = model.generate("anything", domain="code", settings=GenerateSettings(max_new_tokens=3))
    assert given.domain == "code" and given.confidence is None
    prompts = [texts(d, 1, 8)[0] for d in DOMAINS]
    many = model.generate_many(prompts, settings=GenerateSettings(max_new_tokens=4))
    assert [a.domain for a in many] == DOMAINS
    one_by_one = [model.generate(p, settings=GenerateSettings(max_new_tokens=4)) for p in prompts]
    assert [a.domain for a in one_by_one] == DOMAINS


@pytest.mark.integration
def test_unknown_domain_is_a_clear_error(model, stack_path):
    with pytest.raises(UserError, match="medic, money, code"):
        model.generate("hi", domain="nope")
    proc = run_crma("generate", str(stack_path), "hello", "--domain", "nope", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no domain 'nope'" in proc.stderr
    assert "medic, money, code" in proc.stderr


@pytest.mark.integration
def test_generate_and_chat_cli_show_the_answering_domain(stack_path):
    prompt = texts("medic", 1, 9)[0]
    proc = run_crma("generate", str(stack_path), prompt, "--max-new-tokens", "4")
    assert proc.stderr.strip().splitlines()[-1].startswith("[medic, confidence")
    chat = subprocess.run(
        crma_cmd("chat", str(stack_path), "--max-new-tokens", "3"),
        input=f"{texts('code', 1, 9)[0]}\n/reset\n{texts('money', 1, 9)[0]}\n/quit\n",
        cwd=ROOT,
        env=crma_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "[code, confidence" in chat.stdout and "[money, confidence" in chat.stdout
