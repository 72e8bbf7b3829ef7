"""The forgetting protocol end to end on configs/tiny.yaml (tiny random Llama, conflicting domains)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time

import pytest
from helpers import ROOT, TINY_CONFIG, crma_cmd, crma_env, kill_harness, run_crma


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_crma("run", str(TINY_CONFIG), "--out", str(out))
    return out


def load(path):
    return json.loads(path.read_text())


@pytest.mark.integration
def test_loss_matrix_shape_and_frozen_drift_is_exactly_zero(tiny_run):
    report = load(tiny_run / "report.json")
    T = len(report["domains"])
    assert report["domains"] == ["alpha", "beta", "gamma"]
    for label in ("naive", "frozen", "crma"):
        L = load(tiny_run / label / "seed-0" / "loss_matrix.json")["loss_matrix"]
        assert len(L) == T + 1 and all(len(row) == T for row in L)
    frozen = report["methods"]["frozen"]["per_seed"]["0"]
    assert all(v == 0.0 for v in frozen["drift_per_domain"].values())


@pytest.mark.integration
def test_report_drift_equals_independent_recomputation(tiny_run):
    report = load(tiny_run / "report.json")
    for label, method in report["methods"].items():
        L = load(tiny_run / label / "seed-0" / "loss_matrix.json")["loss_matrix"]
        T = len(L) - 1
        expected = [100 * (L[T][i] - L[i + 1][i]) / L[i + 1][i] for i in range(T - 1)]
        got = method["per_seed"]["0"]
        assert list(got["drift_per_domain"].values()) == pytest.approx(expected, abs=1e-12)
        assert got["drift"] == pytest.approx(statistics.fmean(expected), abs=1e-12)


@pytest.mark.integration
def test_training_seconds_are_recorded_per_domain_in_matrix_and_manifest(tiny_run):
    """Without reading any log: the loss matrix holds the run's wall seconds per domain and
    the stack's manifest the training part of them."""
    for label in ("naive", "frozen", "crma"):
        unit = tiny_run / label / "seed-0"
        seconds = load(unit / "loss_matrix.json")["train_seconds"]
        entries = load(unit / "stack" / "manifest.json")["domains"]
        assert len(seconds) == len(entries) == 3 and all(s > 0 for s in seconds)
        assert all(0 < e["train_seconds"] <= s + 0.1 for e, s in zip(entries, seconds))


@pytest.mark.integration
def test_naive_forgets_and_crma_does_not(tiny_run):
    methods = load(tiny_run / "report.json")["methods"]
    naive, crma = methods["naive"]["drift_mean"], methods["crma"]["drift_mean"]
    assert naive > 1.0, f"naive should forget the conflicting domains, drift {naive:.3f}%"
    assert abs(crma) < 0.2, f"crma drift {crma:.3f}%"
    spectral = methods["crma"]["spectral"]
    assert spectral["spectral_norm_dev_max"] < 1e-6 and spectral["steps"] == 3 * 24


@pytest.mark.integration
def test_run_directory_contract(tiny_run):
    for name in ("config.yaml", "report.json", "report.md"):
        assert (tiny_run / name).is_file()
    for plot in (
        "loss_matrix.png",
        "drift.png",
        "tradeoff.png",
        "spectral_norm.png",
        "grad_norm.png",
    ):
        assert (tiny_run / "plots" / plot).stat().st_size > 1000
    run = tiny_run / "crma" / "seed-0"
    assert (run / "stack" / "manifest.json").is_file()
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in (
        "method",
        "seed",
        "domain",
        "step",
        "loss",
        "grad_norm",
        "grad_norm_clipped",
        "lr",
        "spectral_norm_max",
        "rowsum_err_max",
        "colsum_err_max",
    ):
        assert key in first
    assert "| crma |" in (tiny_run / "report.md").read_text()


@pytest.mark.integration
def test_report_command_regenerates_the_same_json(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    (copy / "report.json").unlink()
    (copy / "report.md").unlink()
    run_crma("report", str(copy))
    assert load(copy / "report.json") == load(tiny_run / "report.json")
    assert (copy / "report.md").read_text() == (tiny_run / "report.md").read_text()


@pytest.mark.integration
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_run, tmp_path):
    out = tmp_path / "killed"
    metrics = out / "crma" / "seed-0" / "metrics.jsonl"
    proc = subprocess.Popen(
        crma_cmd("run", str(TINY_CONFIG), "--out", str(out)),
        cwd=ROOT,
        env=crma_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"domain": "beta"' in metrics.read_text():
            proc.kill()  # SIGKILL, mid-domain: no cleanup runs
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -9, "the run should have been killed while training beta"
    assert not (out / "report.json").exists()
    run_crma("run", str(TINY_CONFIG), "--out", str(out))
    assert load(out / "report.json") == load(tiny_run / "report.json")
    assert metrics.read_text().count("\n") == 3 * 24
    assert kill_harness().differences(tiny_run, out) == [], "every file, byte for byte"


@pytest.mark.integration
def test_export_killed_mid_copy_and_rerun_equals_an_export_never_killed(tiny_run, tmp_path):
    harness = kill_harness()
    run_crma("export", str(tiny_run), str(tmp_path / "ref"))
    assert harness.trial("export", "export:4", tmp_path / "dest", tmp_path / "ref", tiny_run) == []


@pytest.mark.integration
def test_run_directory_refuses_a_different_config(tiny_run):
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(tiny_run), "--set", "train.lr=0.5", check=False
    )
    assert proc.returncode == 2 and "different config" in proc.stderr


@pytest.mark.integration
def test_lower_triangle_only_matches_the_full_matrix(tiny_run, tmp_path):
    out = tmp_path / "lower"
    run_crma(
        "run",
        str(TINY_CONFIG),
        "--out",
        str(out),
        "--set",
        "methods=[crma]",
        "--set",
        "eval.future_domains=false",
    )
    full = load(tiny_run / "crma" / "seed-0" / "loss_matrix.json")["loss_matrix"]
    lower = load(out / "crma" / "seed-0" / "loss_matrix.json")["loss_matrix"]
    assert lower[0] == full[0]  # the base row is always complete
    T = len(full) - 1
    for k in range(1, T + 1):
        assert lower[k][:k] == full[k][:k] and lower[k][k:] == [None] * (T - k)
    report = load(out / "report.json")["methods"]["crma"]
    assert report["drift_mean"] == load(tiny_run / "report.json")["methods"]["crma"]["drift_mean"]
    assert "| – |" in (out / "report.md").read_text()


def test_exponent_notation_is_a_number_even_where_yaml_reads_a_string():
    """YAML 1.1 reads `1e-4` (no dot) as a string; a learning rate must still be a float."""
    from crma.protocol.config import load_config

    config = load_config(
        TINY_CONFIG, ["train.lr=1e-4", "methods=[{name: osf, options: {lr: 3e-5}}]"]
    )
    assert config.train.lr == 1e-4
    assert config.methods[0].options["lr"] == "3e-5"  # kept as written; the method parses it
    from crma.methods import make_method

    assert make_method("osf", config.methods[0].options).options.lr == 3e-5


@pytest.mark.integration
def test_reuse_copies_identical_conditions_only(tiny_run, tmp_path):
    same = tmp_path / "same"
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(same), "--set", "methods=[naive]",
        "--reuse", str(tiny_run),
    )  # fmt: skip
    assert "[naive seed 0] reused from" in proc.stdout
    metrics = "naive/seed-0/metrics.jsonl"
    assert (same / metrics).read_bytes() == (tiny_run / metrics).read_bytes()
    naive = load(tiny_run / "report.json")["methods"]["naive"]["drift_mean"]
    assert load(same / "report.json")["methods"]["naive"]["drift_mean"] == naive
    assert load(same / "eval_cache.json").items() >= load(tiny_run / "eval_cache.json").items()

    relabelled = tmp_path / "relabelled"  # a label names a condition; settings decide reuse
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(relabelled), "--set",
        "methods=[{name: naive, label: naive-again}]", "--reuse", str(tiny_run),
    )  # fmt: skip
    assert "[naive-again seed 0] reused from" in proc.stdout
    copied = relabelled / "naive-again/seed-0/metrics.jsonl"
    assert copied.read_bytes() == (tiny_run / metrics).read_bytes()

    other = tmp_path / "other-lr"
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(other), "--set", "methods=[naive]",
        "--set", "train.max_steps=6", "--reuse", str(tiny_run),
    )  # fmt: skip
    assert "] reused from" not in proc.stdout  # the message, not a path
    assert (other / metrics).read_text().count("\n") == 3 * 6


@pytest.mark.integration
def test_only_runs_the_named_conditions_with_their_settings(tiny_run, tmp_path):
    lane = tmp_path / "lane"
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(lane), "--only", "crma", "--only", "naive",
        "--reuse", str(tiny_run),
    )  # fmt: skip
    assert "[crma seed 0] reused from" in proc.stdout, "the config's crma settings, unchanged"
    assert sorted(load(lane / "report.json")["methods"]) == ["crma", "naive"]
    assert not (lane / "frozen").exists()


@pytest.mark.integration
def test_units_record_their_data_and_reuse_takes_only_the_same(tiny_run, tmp_path):
    from crma.model import file_sha256

    recorded = load(tiny_run / "naive/seed-0/loss_matrix.json")["data"]["files"]
    beta = ROOT / "tests/assets/tiny-domains/beta.holdout.jsonl"
    assert recorded["beta"]["holdout"] == file_sha256(beta)
    assert "the user's files" in (tiny_run / "report.md").read_text()

    source = tmp_path / "source"  # the same run, its naive unit computed on other files
    shutil.copytree(tiny_run, source)
    cut = source / "naive/seed-0/loss_matrix.json"
    other = {"files": {**recorded, "beta": {**recorded["beta"], "holdout": "0" * 64}}}
    cut.write_text(json.dumps({**load(cut), "data": other}))
    again = tmp_path / "again"
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(again), "--set", "methods=[naive, frozen]",
        "--reuse", str(source),
    )  # fmt: skip
    assert "[naive seed 0] not reused" in proc.stdout and "other data" in proc.stdout
    assert "[frozen seed 0] reused" in proc.stdout
    proc = run_crma("run", str(TINY_CONFIG), "--out", str(source), check=False)
    # resuming into a folder computed on other data
    assert proc.returncode == 2 and "computed on other data" in proc.stderr


def test_a_reuse_run_whose_config_no_longer_loads_is_passed_over(tmp_path, capsys):
    """Committed trials outlive settings: one written by another crma version (a key this one
    does not know) must not stop a run or a grid that only looks for units to copy."""
    from crma.protocol.config import load_config
    from crma.protocol.store import reusable_unit

    config = load_config(TINY_CONFIG, ["methods=[naive]"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text(TINY_CONFIG.read_text() + "eval: {not_a_key: 1}\n")
    found = reusable_unit(config, config.methods[0], 0, 2, {}, [other])
    assert found is None
    out = capsys.readouterr().out
    assert f"[naive seed 0] not reused from {other}" in out and "not_a_key" in out


def test_units_from_before_the_corpus_tag_are_labelled_legacy(tmp_path):
    from crma.protocol.config import load_config
    from crma.provenance import LEGACY_CORPUS, data_identity, describe_data, recorded_data

    config = load_config(ROOT / "configs/paper.yaml")
    unit = tmp_path / "naive/seed-0"
    unit.mkdir(parents=True)
    (unit / "loss_matrix.json").write_text(json.dumps({"domains": [], "loss_matrix": []}))
    assert recorded_data(unit, embedded=not config.domains) == {"corpus": LEGACY_CORPUS}
    assert "format 1" in describe_data([recorded_data(unit, embedded=True)])
    assert data_identity(config.domains)["corpus"].startswith("v2-")


@pytest.mark.integration
def test_report_learning_equals_independent_recomputation(tiny_run):
    report = load(tiny_run / "report.json")
    for label, method in report["methods"].items():
        L = load(tiny_run / label / "seed-0" / "loss_matrix.json")["loss_matrix"]
        expected = [100 * (L[i][i] - L[i + 1][i]) / L[i][i] for i in range(len(L) - 1)]
        assert method["per_seed"]["0"]["learning_pct"] == pytest.approx(expected, abs=1e-12)
    text = (tiny_run / "report.md").read_text()
    assert "## Learning" in text and "| crma |" in text.split("## Learning")[1]


@pytest.mark.integration
def test_export_keeps_results_without_weights_and_reuse_takes_them(tiny_run, tmp_path):
    source = tmp_path / "source"  # a copy of the run with one unit cut back to unfinished
    shutil.copytree(tiny_run, source)
    cut = source / "crma/seed-0/loss_matrix.json"
    cut.write_text(json.dumps({**load(cut), "loss_matrix": load(cut)["loss_matrix"][:2]}))
    exported = tmp_path / "exported"
    proc = run_crma("export", str(source), str(exported))
    assert "2 finished" in proc.stdout
    assert sorted(p.parent.parent.name for p in exported.glob("*/seed-0/loss_matrix.json")) == [
        "frozen",
        "naive",
    ]
    assert not list(exported.rglob("stack")) and not (exported / "crma").exists()
    for name in ("naive/seed-0/loss_matrix.json", "naive/seed-0/metrics.jsonl", "eval_cache.json"):
        assert (exported / name).read_bytes() == (tiny_run / name).read_bytes()

    again = tmp_path / "again"
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(again), "--set", "methods=[naive, frozen]",
        "--reuse", str(exported),
    )  # fmt: skip
    assert "[naive seed 0] reused from" in proc.stdout and "1/3 alpha" not in proc.stdout
    theirs = load(tiny_run / "report.json")["methods"]
    assert load(again / "report.json")["methods"]["naive"] == theirs["naive"]

    config = source / "config.yaml"  # a unit whose configured evaluations are not done yet
    config.write_text(config.read_text().replace("routing: false", "routing: true"))
    assert "0 finished" in run_crma("export", str(source), str(tmp_path / "none")).stdout

    routed = tmp_path / "routed"  # routing needs the weights the export left behind
    proc = run_crma(
        "run", str(TINY_CONFIG), "--out", str(routed), "--set", "methods=[naive]",
        "--set", "eval.routing=true", "--reuse", str(exported), check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "lacks routing.json:centroid" in proc.stderr and "stack/" in proc.stderr


def test_unit_settings_compare_options_as_the_method_reads_them():
    from crma.protocol.config import load_config, unit_settings

    def settings(method: str) -> dict:
        config = load_config(TINY_CONFIG, [f"methods=[{method}]"])
        return unit_settings(config, config.methods[0])

    assert settings("ewc") == settings("{name: ewc, options: {ewc_lambda: 1e4}}")  # the default
    assert settings("ewc") != settings("{name: ewc, options: {ewc_lambda: 2.0}}")
    assert settings("{name: osf, options: {lr: 3e-5}}") == settings(
        "{name: osf, options: {lr: 0.00003}}"
    )


def test_baselines_config_repeats_the_paper_conditions_exactly():
    """So `crma run configs/baselines.yaml --reuse runs/paper` copies them instead of retraining."""
    from crma.protocol.config import load_config, unit_settings

    paper = load_config(ROOT / "configs" / "paper.yaml")
    baselines = load_config(ROOT / "configs" / "baselines.yaml")
    assert paper.seeds == baselines.seeds
    for spec in paper.methods:
        twin = next(m for m in baselines.methods if m.key == spec.key)
        assert unit_settings(paper, spec) == unit_settings(baselines, twin), spec.key


def test_plots_of_many_methods_wrap_and_stay_readable(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    from crma.report.plots import plot_all

    domains = ["a", "b", "c"]
    matrix = [[3.0, 3.0, 3.0], [2.5, None, None], [2.6, 2.4, None], [2.7, 2.5, 2.3]]
    seed = {"loss_matrix": matrix, "drift_per_domain": {"a": 1.0, "b": 2.0}}
    methods = {
        f"m{j}": {"per_seed": {"0": seed}, "drift_per_domain_mean": {"a": 1.0, "b": 2.0}}
        for j in range(12)
    }
    plot_all(tmp_path, {"domains": domains, "methods": methods})
    height, width = imread(tmp_path / "plots" / "loss_matrix.png").shape[:2]
    # twelve panels in three rows of four (3.2 in each + 1 in, 3.4 in a row, at 110 dpi)
    assert (width, height) == (round(13.8 * 110), round(3 * 3.4 * 110))
    drift = imread(tmp_path / "plots" / "drift.png")
    assert drift.shape[1] <= 16 * 110
    pixels = (drift[..., :3].reshape(-1, 3) * 255).round()
    palette = [tuple(round(255 * c) for c in rgb) for rgb in plt.get_cmap("tab20").colors]
    used = {rgb for rgb in palette if ((pixels == rgb).all(axis=1)).sum() >= 20}
    assert set(palette[:12]) <= used  # tab10 (tab20's even colours) would repeat two
    assert not (tmp_path / "plots" / "tradeoff.png").exists()  # no frozen, no advantage


def test_tradeoff_plot_places_each_method_by_drift_and_advantage(tmp_path, monkeypatch):
    from crma.report import plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig))
    matrix = [[3.0, 3.0], [2.5, None], [2.6, 2.4]]

    def method(drifts: list[float], advantages: list[float]) -> dict:
        seeds = {
            str(s): {
                "loss_matrix": matrix,
                "drift_per_domain": {"a": d},
                "drift": d,
                "advantage_over_frozen": a,
            }
            for s, (d, a) in enumerate(zip(drifts, advantages))
        }
        return {
            "per_seed": seeds,
            "drift_per_domain_mean": {"a": drifts[0]},
            "drift_mean": sum(drifts) / len(drifts),
            "advantage_over_frozen": {"mean": sum(advantages) / len(advantages)},
        }

    methods = {"naive": method([3.0, 3.2], [-5.0, -5.4]), "crma": method([0.0, 0.1], [1.0, 1.2])}
    plots.plot_all(tmp_path, {"domains": ["a", "b"], "methods": methods})
    ax = figures["tradeoff.png"].axes[0]
    means = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert means["naive"] == [[3.1, -5.2]] and means["crma"] == [[0.05, 1.1]]
    seeds = [c.get_offsets().tolist() for c in ax.collections if c.get_label().startswith("_")]
    assert seeds == [[[3.0, -5.0], [3.2, -5.4]], [[0.0, 1.0], [0.1, 1.2]]]
    assert [a.get_text() for a in ax.texts] == ["naive", "crma"]
