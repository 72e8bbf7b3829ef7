"""benchmarks/methods.py on the tiny model: its cost columns against independent counts."""

from __future__ import annotations

import importlib.util
import json

from helpers import ROOT, TINY_BASE, TINY_DATA
from transformers import AutoConfig, AutoTokenizer

from crma.backbone import CRMAConfig
from crma.data import load_records, tokenize_records
from crma.methods import METHODS

EXAMPLES, MAX_LENGTH = 12, 32
FILES = [TINY_DATA / f"{d}.train.jsonl" for d in ("alpha", "beta")]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks/methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_columns(tmp_path):
    out = tmp_path / "methods"
    load_benchmark().main(
        ["--base", str(TINY_BASE), "--methods", "replay,crma", "--rounds", "1", "--steps", "3"]
        + ["--domains", ",".join(map(str, FILES)), "--examples", str(EXAMPLES)]
        + ["--max-length", str(MAX_LENGTH), "--threads", "1", "--out", str(out)]
    )
    rows = json.loads(out.with_suffix(".json").read_text())["methods"]
    assert "| crma | yes |" in out.with_suffix(".md").read_text()
    assert list(rows) == ["naive", "replay", "crma"]  # naive always first: the reference
    naive, replay, crma = rows["naive"], rows["replay"], rows["crma"]

    assert naive["step_x"] == 1.0 and naive["domain_x"] == 1.0
    assert all(r["step_s"] > 0 and r["domain_s"] > r["task_work_s"] for r in rows.values())
    for name, row in rows.items():
        assert row["needs_task_id"] == METHODS[name].needs_task_id

    # The backbone per layer: read R (n x d), write W (d x n), log_mix (n x n), log_alpha (1).
    cfg, n = AutoConfig.from_pretrained(TINY_BASE), CRMAConfig().n_streams
    backbone = cfg.num_hidden_layers * (2 * n * cfg.hidden_size + n * n + 1)
    assert crma["extra_trainable"] == backbone and replay["extra_trainable"] == 0
    assert crma["extra_memory"] == crma["backbone"] == 4 * backbone  # fp32

    # Replay keeps every example of both domains (fewer than its 50 per domain) as int64
    # token ids, labels and one length each.
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    kept = [tokenize_records(load_records(f)[:EXAMPLES], tokenizer, MAX_LENGTH) for f in FILES]
    tokens = sum(len(e["input_ids"]) for examples in kept for e in examples)
    assert replay["extra_memory"] == replay["state"] == 8 * (2 * tokens + 2 * EXAMPLES)
    assert naive["extra_memory"] == 0 and naive["copies"] == 0

    # naive and replay share one LoRA; crma has one per domain.
    assert crma["adapters"] == 2 * naive["adapters"] == 2 * replay["adapters"] > 0
