"""The dashboard's views in-process: what each fragment shows, checked against the stack, the
store and hand-computed drift; its data stays behind the key."""

from __future__ import annotations

import json
import re

import pytest
import torch
from serving import JOB_TRAIN, KEY, app_client
from stacks import build_stack, texts

from crma.serve.dashboard import render
from crma.serve.server import Server

DOMAINS = ["medic", "money"]
# A hand-made loss matrix: rows before training, after medic, after money.
MATRIX = [[4.0, 5.0], [2.0, 4.5], [2.5, 3.0]]


@pytest.fixture(scope="module")
def run_stack(tmp_path_factory):
    """A stack laid out as `crma run` leaves it: RUN/crma/seed-0/{stack, loss_matrix.json}."""
    unit = tmp_path_factory.mktemp("dash") / "run" / "crma" / "seed-0"
    cm = build_stack(unit / "stack", DOMAINS)
    (unit / "loss_matrix.json").write_text(
        json.dumps({"domains": DOMAINS, "seed": 0, "method": "crma", "loss_matrix": MATRIX})
    )
    qa = {
        "method": "crma",
        "domains": DOMAINS,
        "conditions": ["base", "oracle"],
        "results": {
            c: {d: {"probes": {"accuracy": a, "ci95": [a - 0.1, a + 0.05]}} for d in DOMAINS}
            for c, a in (("base", 0.25), ("oracle", 0.5))
        },
    }
    (unit / "stack" / "eval").mkdir()
    (unit / "stack" / "eval" / "qa.json").write_text(json.dumps(qa))  # as `crma eval` writes it
    return unit / "stack", cm


@pytest.fixture(scope="module")
def http(run_stack):
    with app_client(Server(run_stack[0], api_key=KEY, train=JOB_TRAIN)) as client:
        yield client


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_page_is_open_its_data_needs_the_key(http):
    page = http.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and 'data-needs-key="true"' in page.text
    for view in ("stack", "jobs", "try", "forgetting"):
        assert f'href="#{view}"' in page.text
    assert http.get("/static/dashboard.js", headers={"Authorization": ""}).status_code == 200
    assert 'id="login"' in page.text
    assert 'id="login"' not in render("page.html", needs_key=False).body.decode()  # no key: none
    for path in ("/ui/stack", "/ui/jobs", "/ui/forgetting", "/ui/jobs/ftjob-x/series"):
        refused = http.get(path, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401, path


def test_stack_view_lists_domains_in_order_with_the_backbone_now(http, run_stack):
    _, cm = run_stack
    answered = []
    for text in texts("money", 2, 30) + texts("medic", 1, 31):
        body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
        answered.append(http.post("/v1/chat/completions", json=body).json()["crma"]["domain"])
    html = http.get("/ui/stack").text
    rows = re.findall(r'<tr data-domain="(\w+)">(.*?)</tr>', html, re.S)
    assert [name for name, _ in rows] == DOMAINS
    for (_, row), entry in zip(rows, cm.stack.manifest["domains"]):
        cells = text_of(row)
        assert f" {entry['examples']} {entry['steps']} " in cells
        assert f"{entry['final_train_loss']:.4f}" in cells
    shares = {name: re.search(r"([\d.]+)% \((\d+)\)", text_of(row)).groups() for name, row in rows}
    assert shares == {
        d: (f"{100 * answered.count(d) / 3:.1f}", str(answered.count(d))) for d in DOMAINS
    }
    # ‖M‖₂ per layer: the stack's own spectral statistic is the largest of the listed norms.
    norms = [float(v) for v in re.findall(r"<td>(\d\.\d{7})</td>", html)]
    layers = cm.engine.backbone.n_layers
    assert len(norms) == layers
    assert max(norms) == pytest.approx(cm.engine.backbone.spectral_stats()["spectral_norm_max"])
    gates = cm.engine.backbone.gates()
    assert f"{gates.tolist()[0]:.4f}" in html and torch.all(gates > 0)


def test_forgetting_view_shows_the_matrix_and_hand_computed_drift(http):
    html = http.get("/ui/forgetting").text
    cells = re.findall(r"<td style=[^>]*>([\d.]+)</td>", html)
    assert cells == [f"{v:.3f}" for row in MATRIX for v in row]
    # drift of medic: loss after the last stage vs just after learning it, 100·(2.5−2.0)/2.0
    assert "+25.00%" in text_of(html)
    assert "after money" in html and "before training" in html
    qa = text_of(html[html.index('id="qa"') :])
    assert "medic probes money probes" in qa
    assert "base 25.0 [15.0, 30.0] 25.0 [15.0, 30.0] oracle 50.0 [40.0, 55.0]" in qa


def test_job_series_and_progress_follow_the_store(http):
    server = http.app.state.server
    store = server.store
    upload, ask = (
        http.post(
            "/v1/files",
            files={"file": (name, "\n".join(json.dumps({"text": t}) for t in texts(words, n, 3)))},
            data={"purpose": "fine-tune"},
        ).json()
        for name, words, n in (("p.jsonl", "physics", 12), ("ask.jsonl", "asking", 5))
    )
    job_id = "ftjob-" + "0" * 24
    store.add_job(
        {
            "id": job_id,
            "model": "auto",
            "training_file": upload["id"],
            "suffix": "physics",
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0},
            "seed": 1,
            "metadata": {"route_examples": ask["id"]},
        }
    )
    store.update_job(job_id, status="running")  # never queued: the scheduler leaves it alone
    for step, m in [(1, 1.0000002), (2, 0.9999)]:
        data = {"step": step, "train_loss": 3.0 / step, "learning_rate": 0.01, "grad_norm": 2.0,
                "grad_norm_clipped": 1.5, "spectral_norm_max": m}  # fmt: skip
        store.add_event(job_id, f"Step {step}", data=data, step=step)
    series = http.get(f"/ui/jobs/{job_id}/series").json()
    assert series["steps"] == [1, 2] and series["loss"] == [3.0, 1.5]
    assert series["m_dev"] == pytest.approx([2e-7, 1e-4])
    assert series["total_steps"] == 6  # 12 rows / batch 4 × 2 epochs
    assert series["progress"]["step"] == 2 and series["progress"]["fraction"] == pytest.approx(
        2 / 6
    )
    assert http.get(f"/ui/jobs/{job_id}/series?after=1").json()["steps"] == [2]
    html = text_of(http.get(f"/ui/jobs/{job_id}").text)
    assert "physics" in html and "12 uploaded, 12 kept" in html
    assert f"ask.jsonl ({ask['id']}): 5 prompts stored in the router" in html
    assert job_id in http.get("/ui/jobs").text
