"""The dashboard in a real browser: the system's headless Chromium, driven by Playwright, against
a real `crma serve` process on a tiny-model stack. Screenshots of every view go to
test-screenshots/dashboard/ (not committed) for a person to look at.

Chromium comes from the system packages (`apt-get install chromium`), never from a download.
Without it the test is skipped, unless CRMA_REQUIRE_BROWSER=1 (as `.ci/run` sets) makes it fail.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx2
import pytest
from helpers import ROOT
from serving import KEY, free_port, serve_process
from stacks import build_stack, texts

DOMAINS = ["medic", "money"]
MATRIX = [[4.0, 5.0], [2.0, 4.5], [2.5, 3.0]]
SHOTS = ROOT / "test-screenshots" / "dashboard"
pytestmark = pytest.mark.integration  # a real `crma serve` process and a browser
CHROMIUM = os.environ.get("CRMA_CHROMIUM") or shutil.which("chromium")
REQUIRED = os.environ.get("CRMA_REQUIRE_BROWSER") == "1"


def _browser_or_skip():
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "the playwright package is not installed (pip install -e '.[test]')"
    if why is None and not CHROMIUM:
        why = "no system Chromium: `apt-get install chromium` (or set CRMA_CHROMIUM) to run it"
    if why is not None:
        if REQUIRED:
            pytest.fail(f"CRMA_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(f"dashboard browser test: {why}")
    return sync_playwright


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `crma serve` process on a stack laid out as `crma run` leaves it (so the Forgetting
    view has a loss matrix); yields its base URL."""
    unit = tmp_path_factory.mktemp("browser") / "run" / "crma" / "seed-0"
    build_stack(unit / "stack", DOMAINS)
    (unit / "loss_matrix.json").write_text(
        json.dumps({"domains": DOMAINS, "seed": 0, "method": "crma", "loss_matrix": MATRIX})
    )
    port = free_port()
    with serve_process(unit / "stack", port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI runs as root).
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, url: str, key: str | None = KEY):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url + "/")
    if key is not None:
        page.fill("#key", key)
        page.click("#login button")
    return page


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_wrong_key_shows_an_error(browser, served):
    page = open_page(browser, served, key=None)
    page.wait_for_selector("#error:not([hidden])")
    assert "needs an API key" in page.inner_text("#error")
    page.fill("#key", "not-the-key")
    page.click("#login button")
    page.wait_for_function("document.querySelector('#error').innerText.includes('Wrong API key')")
    assert page.query_selector("#domains") is None
    shot(page, "wrong-key")
    page.close()


def test_stack_view_lists_the_domains(browser, served):
    page = open_page(browser, served)
    page.wait_for_selector("#domains")
    names = page.eval_on_selector_all(
        "#domains tr[data-domain]", "rows => rows.map(r => r.dataset.domain)"
    )
    assert names == DOMAINS
    assert page.is_hidden("#error")
    shot(page, "stack")
    page.close()


def test_try_it_answers_with_its_domain_and_every_score(browser, served):
    prompt = texts("money", 1, 40)[0]
    page = open_page(browser, served)
    page.click("nav a[data-view=try]")
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", "8")
    page.click("#try-form button")
    page.wait_for_selector("#answer:not([hidden])")
    api = httpx2.post(
        served + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
              "temperature": 0},
    ).json()  # fmt: skip
    assert page.inner_text("#answer-domain") == api["crma"]["domain"] == "money"
    assert page.inner_text("#answer-text") == api["choices"][0]["message"]["content"]
    rows = page.eval_on_selector_all("#answer-scores tr", "rows => rows.map(r => r.dataset.domain)")
    assert sorted(rows) == sorted(DOMAINS) and rows[0] == "money"  # best first
    shot(page, "try")
    page.close()


def test_forgetting_view_shows_the_loss_matrix(browser, served):
    page = open_page(browser, served)
    page.click("nav a[data-view=forgetting]")
    page.wait_for_selector("#loss-matrix")
    cells = page.eval_on_selector_all("#loss-matrix td", "cells => cells.map(c => c.innerText)")
    assert cells == [f"{v:.3f}" for row in MATRIX for v in row]
    assert "+25.00%" in page.inner_text("#drift")  # medic: 100·(2.5 − 2.0)/2.0
    shot(page, "forgetting")
    page.close()


def test_a_job_started_through_the_api_appears_and_its_chart_grows(browser, served):
    api = httpx2.Client(base_url=served, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    rows = "\n".join(json.dumps({"text": t}) for t in texts("physics", 30, 2))
    upload = api.post(
        "/v1/files", files={"file": ("physics.jsonl", rows)}, data={"purpose": "fine-tune"}
    ).json()
    job = api.post(
        "/v1/fine_tuning/jobs",
        json={"model": "auto", "training_file": upload["id"], "suffix": "physics",
              "hyperparameters": {"n_epochs": 400, "batch_size": 2}},
    ).json()  # fmt: skip
    page = open_page(browser, served)
    page.click("nav a[data-view=jobs]")
    page.wait_for_selector(f"tr[data-job='{job['id']}']")  # the list refreshes every 5 s
    shot(page, "jobs")
    page.click(f"tr[data-job='{job['id']}'] a")
    points = "Number(document.querySelector('#chart-loss')?.dataset.points || 0)"
    page.wait_for_function(f"{points} >= 1", timeout=120_000)
    first = page.evaluate(points)
    page.wait_for_function(f"{points} > {first}", timeout=30_000)  # polled every 2 s
    for chart in ("#chart-lr", "#chart-grad", "#chart-mdev"):
        assert page.evaluate(f"Number(document.querySelector('{chart}').dataset.points)") > first
    assert int(page.inner_text("#job-step")) > 0 and page.inner_text("#job-total") == "6000"
    shot(page, "job")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#job-status').innerText === 'cancelled'")
    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    page.close()
