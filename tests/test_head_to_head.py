"""`crma report RUN --costs`: forgetting numbers from the run, costs from the benchmark, and
the training time each domain took in the run, one table."""

from __future__ import annotations

import json

import pytest
import yaml

from crma.cli import main

DOMAINS = ["a", "b", "c"]
# Seconds crma run recorded per (label, seed): None where an earlier, killed process trained
# the domain (left out of the median).
SECONDS = {
    ("naive", 0): [None, 60, 64],
    ("naive", 1): [80, 70, 90],
    ("ewc", 0): [300, None, 350],
    ("ewc", 1): [500, 400, 450],
}


def matrix(final_a: float) -> list[list[float | None]]:
    """Rows: before training, after a, b, c. Just-trained losses fixed at 2.0."""
    return [
        [3.0, 3.0, 3.0],
        [2.0, None, None],
        [2.1, 2.0, None],
        [final_a, 2.2, 2.0],
    ]


def cost(task_id: bool, extra: int) -> dict:
    return {
        "needs_task_id": task_id,
        "extra_trainable": extra,
        "extra_memory": 4 * extra,
        "step_x": 1.0 + extra / 1e6,
        "domain_x": 1.5,
    }


@pytest.fixture
def run(tmp_path):
    methods = [{"name": "naive", "label": None}, {"name": "crma", "label": "crma-tied"}]
    methods.append({"name": "ewc", "label": None})
    methods.append({"name": "crma", "label": "crma-own", "options": {"k": 1}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"methods": methods, "seeds": [0, 1]}))
    finals = {
        "naive": (2.4, 2.6),
        "crma-tied": (2.0, 2.0),
        "ewc": (2.2, 2.2),
        "crma-own": (2.0, 2.0),
    }
    for label, per_seed in finals.items():
        for seed, final_a in enumerate(per_seed):
            d = run_dir / label / f"seed-{seed}"
            d.mkdir(parents=True)
            body = {"domains": DOMAINS, "seed": seed, "loss_matrix": matrix(final_a)}
            if (label, seed) in SECONDS:
                body["train_seconds"] = SECONDS[label, seed]
            (d / "loss_matrix.json").write_text(json.dumps(body))
    costs = tmp_path / "costs.json"
    settings = {
        "rounds": 2,
        "steps": 4,
        "batch_size": 8,
        "max_length": 64,
        "threads": 2,
        "examples": 32,
    }
    body = {"naive": cost(False, 0), "crma": cost(True, 1000)}  # no ewc row: a gap, not a crash
    costs.write_text(json.dumps({"settings": settings, "methods": body}))
    return run_dir, costs


def head_to_head(run_dir, *args: str) -> int:
    return main(["report", str(run_dir), *args])


def test_table_joins_drift_with_the_costs_of_the_method_a_label_runs(run, tmp_path):
    run_dir, costs = run
    out = tmp_path / "out"
    assert head_to_head(run_dir, "--costs", str(costs), "--out", str(out)) == 0
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["head_to_head"]}
    # drift of a = 100·(final − 2.0)/2.0, of b = 100·(2.2 − 2.0)/2.0; c is last: the mean of two
    expected = {s: (100 * (a - 2.0) / 2.0 + 10.0) / 2 for s, a in enumerate((2.4, 2.6))}
    assert rows["naive"]["drift_mean"] == pytest.approx(sum(expected.values()) / 2)
    assert rows["naive"]["drift_range"] == pytest.approx([expected[0], expected[1]])
    assert rows["crma-tied"]["extra_trainable"] == 1000 and rows["crma-tied"]["needs_task_id"]
    assert rows["ewc"]["step_x"] is None
    assert rows["crma-own"]["extra_trainable"] is None, "its own options: not crma's costs"
    text = (out / "report.md").read_text()
    assert "| crma-tied | " in text and "+1,000 | 3.9 KiB | 1.00 | 1.50 | yes |" in text
    assert "| ewc |" in text and "| – | – | – |" in text
    assert "2 rounds × 4 steps, batch 8 × 64 tokens, 32 examples per domain" in text
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()


def test_missing_cost_file_is_a_one_line_error_and_writes_nothing(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "out"
    assert head_to_head(run_dir, "--costs", str(tmp_path / "nope.json"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.json" in err and "benchmarks/methods.py" in err
    assert not out.exists() and not (run_dir / "report.json").exists()


def test_an_unreadable_earlier_table_is_a_one_line_error_and_is_kept(run, tmp_path, capsys):
    run_dir, costs = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{half")
    assert head_to_head(run_dir, "--costs", str(costs), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'report.json'}: invalid JSON" in err
    assert (out / "report.json").read_text() == "{half" and not (run_dir / "report.json").exists()


def test_the_time_per_domain_is_the_median_crma_run_recorded(run, tmp_path):
    run_dir, costs = run
    out = tmp_path / "out"
    assert head_to_head(run_dir, "--costs", str(costs), "--out", str(out)) == 0
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["head_to_head"]}
    assert rows["naive"]["train_s_per_domain"] == 70  # median of 60, 64, 80, 70, 90
    assert rows["ewc"]["train_s_per_domain"] == 400  # median of 300, 350, 500, 400, 450
    assert rows["crma-tied"]["train_s_per_domain"] is None  # its matrices record none
    text = (out / "report.md").read_text()
    assert "| 70 (1.0×) |" in text and "| 400 (5.7×) |" in text and "train s/domain" in text


def test_without_out_the_table_heads_the_run_directory_report(run):
    run_dir, costs = run
    assert head_to_head(run_dir, "--costs", str(costs)) == 0
    assert (run_dir / "report.md").read_text().startswith("# Head to head")
    assert "head_to_head" in json.loads((run_dir / "report.json").read_text())


def rerun_ewc(run_dir, final_a: float, ewc_lambda: float) -> None:
    """The same run with EWC retrained at another strength: its settings and numbers change."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    ewc = next(m for m in config["methods"] if m["name"] == "ewc")
    ewc["options"] = {"ewc_lambda": ewc_lambda}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for seed in (0, 1):
        path = run_dir / "ewc" / f"seed-{seed}" / "loss_matrix.json"
        body = json.loads(path.read_text()) | {"loss_matrix": matrix(final_a)}
        path.write_text(json.dumps(body))


@pytest.mark.parametrize("elsewhere", [True, False], ids=["out", "run-dir"])
def test_a_table_written_again_keeps_the_rows_that_moved_as_before(run, tmp_path, elsewhere):
    run_dir, costs = run
    out = tmp_path / "out" if elsewhere else run_dir
    where = ["--out", str(out)] if elsewhere else []
    assert head_to_head(run_dir, "--costs", str(costs), *where) == 0
    assert json.loads((out / "report.json").read_text())["history"] == []
    rerun_ewc(run_dir, final_a=2.4, ewc_lambda=100.0)
    note = ["--before-note", "five-trial budget"]
    assert head_to_head(run_dir, "--costs", str(costs), *where, *note) == 0
    report = json.loads((out / "report.json").read_text())
    (entry,) = report["history"]
    (row,) = entry["rows"]  # naive, crma-tied and crma-own did not move
    assert row["method"] == "ewc" and entry["note"] == "five-trial budget"
    assert row["drift_mean"] == pytest.approx((10.0 + 10.0) / 2)  # final a 2.2: +10 %, b +10 %
    now = next(r for r in report["head_to_head"] if r["method"] == "ewc")
    assert now["drift_mean"] == pytest.approx((20.0 + 10.0) / 2)
    if elsewhere:  # a run directory's own config cannot change under it (crma run refuses)
        assert row["settings_changed"] == ["options.ewc_lambda: – → 100.0"]
    text = (out / "report.md").read_text()
    assert "## Before" in text and "### 1. five-trial budget" in text
    assert "| ewc | +10.00 ± 0.00 → +15.00 ± 0.00 |" in text
    # Written again from the same units: nothing moved, the history is carried, not doubled.
    assert head_to_head(run_dir, "--costs", str(costs), *where) == 0
    assert json.loads((out / "report.json").read_text())["history"] == report["history"]


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "rebuilt"])
def test_an_older_entry_stays_beside_the_row_that_replaced_it_then(run, tmp_path, stored):
    run_dir, costs = run
    out = tmp_path / "out"
    assert head_to_head(run_dir, "--costs", str(costs), "--out", str(out)) == 0
    rerun_ewc(run_dir, final_a=2.4, ewc_lambda=100.0)
    assert (
        head_to_head(run_dir, "--costs", str(costs), "--out", str(out), "--before-note", "first")
        == 0
    )
    if not stored:  # a report written before the replacing rows were kept
        report = json.loads((out / "report.json").read_text())
        for row in report["history"][0]["rows"]:
            del row["after"]
        (out / "report.json").write_text(json.dumps(report))
    rerun_ewc(run_dir, final_a=2.6, ewc_lambda=1000.0)
    assert (
        head_to_head(run_dir, "--costs", str(costs), "--out", str(out), "--before-note", "second")
        == 0
    )
    second, first = json.loads((out / "report.json").read_text())["history"]
    assert first["rows"][0]["after"]["drift_mean"] == pytest.approx(15.0)  # not today's 20
    assert first["rows"][0]["settings_changed"] == ["options.ewc_lambda: – → 100.0"]
    assert second["rows"][0]["settings_changed"] == ["options.ewc_lambda: 100.0 → 1000.0"]
    text = (out / "report.md").read_text()
    one, two = text.index("### 1. second"), text.index("### 2. first")
    assert text.index("| ewc | +15.00 ± 0.00 → +20.00 ± 0.00 |") in range(one, two)
    assert text.index("| ewc | +10.00 ± 0.00 → +15.00 ± 0.00 |") > two
