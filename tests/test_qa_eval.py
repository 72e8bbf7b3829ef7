"""QA evaluation: conditions, Wilson intervals, routed reuse, CLI, and the protocol/report hook."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import TINY_BASE, run_crma
from stacks import build_stack, texts

from crma.data.qa import make_probes
from crma.eval.qa import (
    QASettings,
    evaluate_qa,
    option_scores,
    predict,
    score_choices,
    tally,
    write_eval,
)
from crma.eval.sections import answer_markdown, answer_report, plot_answers, verdict
from crma.eval.stats import paired_difference, wilson_interval
from crma.routing.router import Route, Router

DOMAINS = ["medic", "money"]


def test_wilson_interval_matches_the_published_ablation_values():
    assert wilson_interval(98, 100) == pytest.approx((0.930, 0.994), abs=5e-4)
    assert wilson_interval(38, 100) == pytest.approx((0.291, 0.478), abs=5e-4)


def test_paired_difference_matches_the_textbook_adjusted_wald_interval():
    a, b = "1101101110", "1001110100"  # 3 items right only with a, 1 only with b, of 10
    # Agresti & Min: a half count added to each of the 2×2 cells (n = 10 + 4 × 1/2)
    p10, p01 = 3.5 / 12, 1.5 / 12
    half = 1.96 * math.sqrt((p10 + p01 - (p10 - p01) ** 2) / 12)
    r = paired_difference(a, b)
    assert r["difference"] == pytest.approx(0.2)
    assert r["ci95"] == pytest.approx([p10 - p01 - half, p10 - p01 + half])
    assert (r["only_a"], r["only_b"], r["n"]) == (3, 1, 10)
    same = paired_difference(a, a)["ci95"]  # no disagreement still leaves an interval
    assert same[0] < 0 < same[1]
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


def test_report_pairs_each_method_with_frozen_and_naive_on_the_same_items(tmp_path):
    """Seeds are pooled item by item; each method is compared as deployed: routed where it
    needs a task id, its one model (oracle) where it has a single shared adapter."""
    items = [{"answer": 0}] * 4
    preds = {  # (method, seed) -> predictions as deployed; other conditions all wrong
        ("crma", 0): [0, 0, 1, 0],
        ("crma", 1): [0, 1, 1, 1],
        ("frozen", 0): [0, 1, 1, 0],
        ("frozen", 1): [0, 0, 0, 1],
        ("naive", 0): [1, 0, 0, 0],
        ("naive", 1): [1, 1, 0, 0],
    }
    for (label, seed), deployed in preds.items():
        shared = label == "naive"  # one adapter for every domain: nothing to route
        conditions = ["base", "oracle"] + ([] if shared else ["routed"])
        results = {c: {"medic": {"probes": tally(items, [1] * 4)}} for c in conditions}
        results["oracle" if shared else "routed"]["medic"]["probes"] = tally(items, deployed)
        unit = tmp_path / label / f"seed-{seed}"
        unit.mkdir(parents=True)
        qa = {"domains": ["medic"], "conditions": conditions, "results": results}
        (unit / "qa.json").write_text(json.dumps(qa))
    labels = ("crma", "frozen", "naive")
    report = {
        "domains": ["medic"],
        "methods": {m: {"per_seed": {"0": {}, "1": {}}} for m in labels},
    }
    report.update(answer_report(tmp_path, report))
    pairs = {(p["method"], p["minus"]): p for p in report["qa_paired"]}
    assert set(pairs) == {
        ("crma", "frozen"),
        ("naive", "frozen"),
        ("crma", "naive"),
    }
    assert pairs["crma", "frozen"]["conditions"] == ["routed", "routed"]
    assert pairs["crma", "naive"]["conditions"] == ["routed", "oracle"]
    hits = {k: "".join("1" if p == 0 else "0" for p in v) for k, v in preds.items()}
    for a, b in pairs:
        expected = paired_difference(hits[a, 0] + hits[a, 1], hits[b, 0] + hits[b, 1])
        assert pairs[a, b]["results"]["medic"]["probes"] == expected, (a, b)
    assert pairs["crma", "frozen"]["results"]["medic"]["probes"]["difference"] == -1 / 8
    assert pairs["naive", "frozen"]["results"]["medic"]["probes"]["difference"] == 0.0
    markdown = "\n".join(answer_markdown(report))
    assert "| crma | frozen | routed − routed | -12.5 [" in markdown
    assert "| crma | undecided |" in markdown, "8 items cannot decide a 1-point margin"
    assert "| crma | naive" not in markdown.split("**Target")[1], "the target is against frozen"
    plot_answers(tmp_path, report)
    assert (tmp_path / "plots" / "qa_paired.png").stat().st_size > 1000


def test_report_shows_how_the_qa_prompts_were_routed_averaged_over_seeds(tmp_path):
    items = [{"answer": 0}] * 4
    for seed, share in ((0, 0.5), (1, 0.75)):
        unit = tmp_path / "crma" / f"seed-{seed}"
        unit.mkdir(parents=True)
        results = {c: {"medic": {"mmlu": tally(items, [0] * 4)}} for c in ("base", "routed")}
        routing = {"medic": {"mmlu": {"to_own_domain": share, "fallback": 0.0}}}
        qa = {"domains": ["medic"], "conditions": ["base", "routed"], "results": results}
        (unit / "qa.json").write_text(json.dumps({**qa, "routing_of_items": routing}))
    report = {"domains": ["medic"], "methods": {"crma": {"per_seed": {"0": {}, "1": {}}}}}
    report.update(answer_report(tmp_path, report))
    assert report["qa"]["crma"]["to_own_domain"] == {"medic": {"mmlu": 0.625}}
    lines = answer_markdown(report)
    assert "| crma | – | 62.5 |" in lines  # no probes: a dash, not a number


@pytest.mark.parametrize(
    ("ci95", "expected"),
    [
        ([-0.009, 0.03], "met"),
        ([0.01, 0.03], "met"),
        ([-0.05, -0.011], "missed"),
        ([-0.05, 0.02], "undecided"),
    ],
)
def test_the_qa_target_is_decided_only_when_the_interval_clears_the_margin(ci95, expected):
    assert verdict({"ci95": ci95}) == expected


def test_report_pairs_backbone_on_with_off_on_the_same_weights(tmp_path):
    items = [{"answer": 0}] * 4
    conditions = ["base", "oracle", "routed", "backbone_off"]
    on_off = {0: ([0, 0, 0, 1], [1, 0, 1, 1]), 1: ([0, 1, 0, 0], [0, 1, 1, 0])}
    for seed, (on, off) in on_off.items():
        results = {c: {"medic": {"probes": tally(items, [1] * 4)}} for c in conditions}
        results["oracle"]["medic"]["probes"] = tally(items, on)
        results["backbone_off"]["medic"]["probes"] = tally(items, off)
        unit = tmp_path / "crma" / f"seed-{seed}"
        unit.mkdir(parents=True)
        qa = {"domains": ["medic"], "conditions": conditions, "results": results}
        (unit / "qa.json").write_text(json.dumps(qa))
    report = {"domains": ["medic"], "methods": {"crma": {"per_seed": {"0": {}, "1": {}}}}}
    report.update(answer_report(tmp_path, report))
    (pair,) = report["qa_paired"]
    assert (pair["minus"], pair["conditions"]) == ("crma backbone off", ["oracle", "backbone_off"])
    # on: right on 3 + 3 of 8, off: 1 + 2 of 8
    assert pair["results"]["medic"]["probes"] == paired_difference("11101011", "01001001")
    assert pair["results"]["medic"]["probes"]["difference"] == 3 / 8


def probe_items(domain: str, n: int = 6) -> list[dict]:
    rows = [
        {"id": f"{domain}-{i}", "domain": domain, "text": t + " " + t}
        for i, t in enumerate(texts(domain, 12, seed=4))
    ]
    return make_probes(rows, n=n, seed=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "stack"
    return path, build_stack(path, DOMAINS)


def test_conditions_match_independent_scoring(stack):
    _, cm = stack
    items = {d: {"probes": probe_items(d)} for d in DOMAINS}
    result = evaluate_qa(cm, items)
    assert result["conditions"] == ["base", "oracle", "routed", "backbone_off"]
    assert cm.engine.backbone.enabled  # the ablation switched it back on

    from crma.model import load_base

    plain, tok = load_base(str(TINY_BASE))  # base condition = a base model with nothing attached
    its = items["money"]["probes"]
    expected = sum(p == i["answer"] for i, p in zip(its, score_choices(plain, tok, its)))
    assert result["results"]["base"]["money"]["probes"]["correct"] == expected
    with cm.engine.using(cm.method.adapter_name("money")):
        oracle = score_choices(cm.engine.model, tok, its)
    assert result["results"]["oracle"]["money"]["probes"]["correct"] == sum(
        p == i["answer"] for i, p in zip(its, oracle)
    )
    cell = result["results"]["oracle"]["money"]["probes"]
    assert cell["total"] == 6 and cell["ci95"] == list(wilson_interval(cell["correct"], 6))


def reference_scores(model, tok, items, max_length):
    """Each option alone, prompt + option in one unpadded forward pass, its tokens' mean
    log-probability: the plain definition, computed without a cache or padding."""
    import torch

    from crma.eval.qa import prompt_and_options

    scores = []
    for item in items:
        prompt, options = prompt_and_options(item)
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        prompt_ids = prompt_ids[-(max_length - max(map(len, option_ids))) :]
        row = []
        for ids in option_ids:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0]
            logp = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
            row.append(logp.gather(-1, torch.tensor(ids)[:, None]).mean().item())
        scores.append(row)
    return scores


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_prompt_scoring_matches_each_option_scored_alone(stack, batch_size):
    """Prompts of different lengths in one batch (left padding), items with 4 and 3 options,
    a prompt cut to fit max_length; with a domain's adapter and the CRMA backbone on."""
    _, cm = stack
    items = probe_items("money")
    items[1] = {**items[1], "options": items[1]["options"][:3], "answer": 0}
    items[2] = {**items[2], "prompt": " ".join([items[2]["prompt"]] * 6)}
    tok = cm.engine.tokenizer
    with cm.engine.using(cm.method.adapter_name("money")):
        model = cm.engine.model
        got = option_scores(model, tok, items, batch_size=batch_size, max_length=48)
        want = reference_scores(model, tok, items, max_length=48)
    assert [len(r) for r in got] == [4, 3, 4, 4, 4, 4]
    assert max(abs(g - w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)) < 1e-4


def test_backbone_off_and_routed_use_other_weights(stack):
    _, cm = stack
    medic, money = cm.method.adapter_name("medic"), cm.method.adapter_name("money")
    its = probe_items("medic")
    s, cache = QASettings(), {}
    predict(cm.engine, its, medic, True, s, cache)
    predict(cm.engine, its, medic, False, s, cache)
    assert len(cache) == 2, "backbone on and off must be distinct weights"
    from crma.eval.qa import routed_predictions

    router = Router(cm)
    wrong = [Route("money", 1.0, "money")] * len(its)
    got = routed_predictions(cm, its, wrong, router, ((medic,), [9] * len(its)), s, None)
    assert got == predict(cm.engine, its, money, True, s)  # rescored with the routed adapter
    right = [Route("medic", 1.0, "medic")] * len(its)
    reused = routed_predictions(cm, its, right, router, ((medic,), [9] * len(its)), s, None)
    assert reused == [9] * len(its)  # routed to the oracle's adapters: oracle answers reused


def test_cache_is_handed_over_after_each_domain(stack):
    """A killed QA run resumes from the last finished domain: the hook sees its cache grow."""
    _, cm = stack
    cache: dict = {}
    sizes: list[int] = []
    items = {d: {"probes": probe_items(d, 3)} for d in DOMAINS}
    evaluate_qa(cm, items, cache=cache, on_domain_done=lambda d: sizes.append(len(cache)))
    assert len(sizes) == len(DOMAINS) and 0 < sizes[0] < sizes[1] == len(cache)


@pytest.mark.integration
def test_markdown_and_cli(stack, tmp_path):
    path, cm = stack
    result = evaluate_qa(cm, {"medic": {"probes": probe_items("medic")}})
    j, md = write_eval(result, tmp_path)
    text = md.read_text()
    assert "| backbone_off |" in text and "medic probes" in text and "[" in text
    probes = tmp_path / "medic.jsonl"
    probes.write_text("".join(json.dumps(i) + "\n" for i in probe_items("medic", 4)))
    out = tmp_path / "cli"
    proc = run_crma("eval", str(path), "--probes", f"medic={probes}", "--out", str(out))
    data = json.loads((out / "qa.json").read_text())
    assert data["results"]["oracle"]["medic"]["probes"]["total"] == 4
    assert "no QA items for money" in proc.stderr and "QA: medic scored (1/1)" in proc.stderr
    bad = run_crma("eval", str(path), "--probes", f"nope={probes}", check=False)
    assert bad.returncode == 2 and "medic, money" in bad.stderr


@pytest.mark.integration
def test_protocol_routing_section_in_report(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    domains = []
    for d in ["medic", "money", "code"]:
        for split, seed, n in (("train", 0, 24), ("holdout", 1, 8)):
            (data / f"{d}.{split}.jsonl").write_text(
                "".join(json.dumps({"text": t}) + "\n" for t in texts(d, n, seed))
            )
        domains.append(
            {
                "name": d,
                "train": str(data / f"{d}.train.jsonl"),
                "holdout": str(data / f"{d}.holdout.jsonl"),
            }
        )
    config = {
        "base": str(TINY_BASE),
        "methods": ["naive", "crma"],
        "seeds": [0],
        "domains": domains,
        "train": {
            "lr": 0.03,
            "batch_size": 8,
            "max_steps": 4,
            "max_length": 32,
            "precision": "fp32",
        },
        "lora": {"r": 4, "alpha": 8},
        "eval": {"routing": True, "routers": ["centroid", "arrow"]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    run_crma("run", str(tmp_path / "c.yaml"), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    crma = report["routing"]["crma"]["centroid"]
    assert crma["top1"] == {"medic": 1.0, "money": 1.0, "code": 1.0}
    assert crma["drift_routed_mean"] == pytest.approx(crma["drift_oracle_mean"], abs=1e-9)
    naive = report["routing"]["naive"]["centroid"]
    assert naive["drift_routed_mean"] == pytest.approx(naive["drift_oracle_mean"], abs=1e-9)
    assert "## Routing" in (out / "report.md").read_text()
    assert (out / "plots" / "routing_crma_arrow.png").stat().st_size > 1000
    assert "arrow" not in report["routing"]["naive"]  # one shared adapter: nothing to choose

    # A run that reuses these stacks with one more router adds just that router's section.
    config["eval"]["routers"] = ["centroid", "arrow", "loss", "fast"]
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(config))
    again = tmp_path / "again"
    proc = run_crma("run", str(tmp_path / "more.yaml"), "--out", str(again), "--reuse", str(out))
    assert "[crma seed 0] reused from" in proc.stdout
    first = json.loads((out / "crma" / "seed-0" / "routing.json").read_text())
    routing = json.loads((again / "crma" / "seed-0" / "routing.json").read_text())
    assert routing["centroid"] == first["centroid"] and routing["loss"]["top1_mean"] > 0.5
    assert routing["fast"]["top1_mean"] > 0.5  # the serving router, stored at each commit


@pytest.mark.integration
def test_route_questions_rebuild_the_stored_routers_and_remeasure_routing_and_qa(tmp_path):
    """A run that asks for route questions reuses the trained stacks, stores them in their
    routers, and measures routing and routed QA again; an export measured without them is not
    taken for a run that asks for them."""
    config = {
        "base": str(TINY_BASE),
        "methods": ["frozen"],
        "seeds": [0],
        "corpus": {"order": ["medical", "code"], "train_size": 8, "holdout_size": 4},
        "train": {"lr": 0.03, "batch_size": 4, "max_steps": 2, "max_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "eval": {"routing": True, "qa": True, "qa_probes": 3, "qa_mmlu": 6},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    first = tmp_path / "first"
    run_crma("run", str(tmp_path / "c.yaml"), "--out", str(first))
    unit = first / "frozen" / "seed-0"
    assert json.loads((unit / "routing.json").read_text())["route_questions"] == 0
    run_crma("export", str(first), str(tmp_path / "export"))

    asked = ["--set", "eval.route_questions=5"]
    again = tmp_path / "again"
    proc = run_crma(
        "run", str(tmp_path / "c.yaml"), "--out", str(again), "--reuse", str(first), *asked
    )
    assert "reused from" in proc.stdout
    unit = again / "frozen" / "seed-0"
    manifest = json.loads((unit / "stack" / "manifest.json").read_text())
    assert manifest["router"]["route_examples"] == {"medical": 5, "code": 5}
    for name in ("routing.json", "qa.json"):
        assert json.loads((unit / name).read_text())["route_questions"] == 5

    from_export = tmp_path / "from-export"
    bad = run_crma(
        "run",
        str(tmp_path / "c.yaml"),
        "--out",
        str(from_export),
        "--reuse",
        str(tmp_path / "export"),
        *asked,
        check=False,
    )
    assert bad.returncode == 2 and "lacks routing.json:centroid, qa.json" in bad.stderr


@pytest.mark.integration
def test_base_only_scores_the_plain_base_model_on_the_corpus_items(tmp_path):
    from crma.data.corpus import DOMAINS, corpus_file
    from crma.eval.qa import corpus_items, read_items
    from crma.model import load_base

    out = tmp_path / "base"
    limits = ["--probes-limit", "3", "--mmlu-limit", "2", "--mmlu-order", "first"]
    run_crma("eval", "--base-only", "--base", str(TINY_BASE), *limits, "--out", str(out))
    data = json.loads((out / "qa.json").read_text())
    assert data["conditions"] == ["base"] and data["domains"] == list(DOMAINS)
    settings = QASettings(probes_limit=3, mmlu_limit=2, mmlu_order="first")
    items = corpus_items(list(DOMAINS), settings)
    assert items["legal"]["mmlu"] == read_items(corpus_file("legal", "mmlu"))[:2]
    model, tok = load_base(str(TINY_BASE))
    model.eval()
    for domain, kinds in items.items():
        for kind, its in kinds.items():  # the plain model, scored without the engine
            assert data["results"]["base"][domain][kind] == tally(
                its, score_choices(model, tok, its)
            )
