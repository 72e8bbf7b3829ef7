"""benchmarks/methods.py on the tiny model: its cost columns against independent counts."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import ROOT, TINY_BASE, TINY_CONFIG, TINY_DATA
from transformers import AutoConfig, AutoTokenizer

from benchmarks import methods as bench_methods
from crma.backbone import CRMAConfig
from crma.data import load_records, tokenize_records
from crma.methods import METHODS

EXAMPLES, MAX_LENGTH = 12, 32
FILES = [TINY_DATA / f"{d}.train.jsonl" for d in ("alpha", "beta")]


def test_cost_columns(tmp_path):
    out = tmp_path / "methods"
    bench_methods.main(
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


def test_a_config_s_entries_are_measured_with_their_own_settings(tmp_path):
    """`--config`: each method entry by its label, with its options and the config's LoRA:
    the budget-matched OSF trains r·(d_out + d_in + 1) per targeted matrix, not OSF's default."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    qv = {"target_modules": ["q_proj", "v_proj"], "trainable_rank": 2}
    config["methods"] = ["naive", {"name": "osf", "label": "osf-qv", "options": qv}]
    config["base"] = str(TINY_BASE)
    for d in config["domains"]:
        d.update({k: str(ROOT / d[k]) for k in ("train", "holdout")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "methods"
    bench_methods.main(
        ["--base", str(TINY_BASE), "--config", str(path), "--rounds", "1", "--steps", "3"]
        + ["--domains", ",".join(map(str, FILES)), "--examples", str(EXAMPLES)]
        + ["--max-length", str(MAX_LENGTH), "--threads", "1", "--out", str(out)]
    )
    rows = json.loads(out.with_suffix(".json").read_text())["methods"]
    assert list(rows) == ["naive", "osf-qv"]
    cfg = AutoConfig.from_pretrained(TINY_BASE)
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    budget = cfg.num_hidden_layers * 2 * ((d + d + 1) + (kv + d + 1))
    assert rows["osf-qv"]["trainable"] == budget
    # naive: the config's LoRA (r 4 on all seven projections), not PEFT's default q/v at r 8
    lora = config["lora"]["r"] * sum(
        a + b for a, b in [(d, d), (d, kv), (d, kv), (d, d)] + 3 * [(d, cfg.intermediate_size)]
    )
    assert rows["naive"]["trainable"] == cfg.num_hidden_layers * lora


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "nope.yaml"], "--config: nope.yaml: no such file"),
        (["--config", str(TINY_CONFIG), "--methods", "crma"], "--methods: not with --config"),
    ],
)
def test_bad_benchmark_arguments_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_methods.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
