"""`crma serve` in-process: the official openai client over the app on a tiny stack."""

from __future__ import annotations

import json
import shutil
import threading

import openai
import pytest
import torch
from serving import JOB_TRAIN, KEY, app_client, wait_for
from stacks import build_stack, texts

from crma.generate import load_stack
from crma.serve.batcher import Batcher, Request
from crma.serve.config import ServeSettings
from crma.serve.sampling import Sampling
from crma.serve.server import Server
from crma.serve.snapshot import Snapshot

DOMAINS = ["medic", "money", "code"]


@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "stack"
    build_stack(path, DOMAINS)
    return path


@pytest.fixture(scope="module")
def server(stack_path):
    return Server(stack_path, api_key=KEY, train=JOB_TRAIN)


@pytest.fixture(scope="module")
def http(server):
    with app_client(server) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0
    )


def chat(client, model, text, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kw
    )


def test_models_list_auto_each_domain_and_base(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["auto", *DOMAINS, "base"]
    for m in models.values():
        assert m.owned_by == "crma" and m.created > 0
    assert models["money"].model_extra["crma"]["steps"] == 6
    assert models["auto"].model_extra["crma"]["domains"] == DOMAINS
    assert client.models.retrieve("code").id == "code"


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_chunks_reassemble_the_whole_answer(client, kind):
    prompt = texts("medic", 1, 11)[0]
    if kind == "chat":
        whole = chat(client, "auto", prompt, max_tokens=16)
        stream = chat(client, "auto", prompt, max_tokens=16, stream=True)
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        text = whole.choices[0].message.content
    else:
        args = {"model": "auto", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        whole = client.completions.create(**args)
        parts = [c.choices[0].text for c in client.completions.create(**args, stream=True)]
        text = whole.choices[0].text
    assert whole.model == "medic" and whole.usage.completion_tokens == 16
    assert text and "".join(parts) == text
    assert whole.choices[0].finish_reason == "length"


def test_auto_routes_a_named_domain_does_not(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": texts("money", 1, 3)[0]}],
        max_tokens=4,
        temperature=0,
    )
    routed = raw.parse()
    assert routed.model == "money" and raw.headers["x-crma-domain"] == "money"
    info = routed.model_extra["crma"]
    assert info["domain"] == "money" and info["requested"] == "auto"
    assert 0.5 < info["confidence"] <= 1
    scores = info["scores"]  # the router's probability of every domain; the answer's is largest
    assert list(scores) == DOMAINS and sum(scores.values()) == pytest.approx(1.0)
    assert scores["money"] == pytest.approx(info["confidence"]) == max(scores.values())
    assert float(raw.headers["x-crma-confidence"]) == pytest.approx(info["confidence"], abs=1e-4)
    named = chat(client, "code", texts("money", 1, 3)[0], max_tokens=4)
    assert named.model == "code" and named.model_extra["crma"]["confidence"] is None
    assert named.model_extra["crma"]["scores"] is None
    assert chat(client, "base", "hello", max_tokens=2).model == "base"
    # The adapters differ, so answering through another domain changes the text.
    answers = {
        d: chat(client, d, texts("money", 1, 3)[0]).choices[0].message.content for d in DOMAINS
    }
    assert len(set(answers.values())) > 1


def test_stop_seed_and_n(client):
    prompt = texts("code", 1, 4)[0]
    full = client.completions.create(model="code", prompt=prompt, max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(
        model="code", prompt=prompt, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    args = {"model": "code", "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 5}
    a, b = client.completions.create(**args, n=3), client.completions.create(**args, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws its own tokens


def test_client_errors(client, http):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        chat(client, "nope", "hi")
    bad_key = openai.OpenAI(
        base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, "auto", "hi", temperature=7)
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, "auto", "heart " * 400)


NO_FILE = "file-000000000000000000000000"


def _upload(name: str, content: bytes):
    return {"files": {"file": (name, content)}, "data": {"purpose": "fine-tune"}}


BAD = [
    ("post", "/v1/chat/completions", {"content": b"{not json"}, 400),
    ("post", "/v1/chat/completions", {"json": [1, 2]}, 400),
    ("post", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto"}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto", "messages": []}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto", "messages": [{"role": "robot", "content": "x"}]}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto", "messages": [{"role": "user", "content": 5}]}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "", "messages": [{"role": "user", "content": "x"}]}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}, 404),
    ("post", "/v1/chat/completions", {"json": {"model": "../manifest.json", "messages": [{"role": "user", "content": "x"}]}}, 404),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "temperature": 2.5}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "temperature": -1}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "top_p": 0}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "top_p": 1.5}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "max_tokens": 0}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "max_tokens": 100000}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "max_tokens": 300}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "n": 0}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "n": 99}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "stop": [""]}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "seed": -3}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "stream": [1]}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "echo": True}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": "x", "logprobs": 2}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": ["a", "b"]}}, 400),
    ("post", "/v1/completions", {"json": {"model": "auto", "prompt": ""}}, 400),
    ("post", "/v1/chat/completions", {"json": {"model": "auto", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}}, 400),
    ("post", "/v1/completions", {"content": b'{"model": "auto", "prompt": "' + b"x" * (1 << 21) + b'"}'}, 413),
    ("get", "/v1/nothing-here", {}, 404),
    ("delete", "/v1/models", {}, 405),
    ("get", "/v1/models/nope", {}, 404),
    ("get", "/v1/files/file-notanid", {}, 400),
    ("get", "/v1/files/..%2F..%2Fmanifest.json", {}, 404),
    ("get", "/v1/files/file-000000000000000000000000", {}, 404),
    ("delete", "/v1/files/file-000000000000000000000000", {}, 404),
    ("post", "/v1/files", {"files": {"file": ("a.jsonl", b'{"text": "fine text, long enough"}')}}, 400),
    ("post", "/v1/files", {**_upload("a.jsonl", b'{"text": "x"}\n'), "data": {"purpose": "assistants"}}, 400),
    ("post", "/v1/files", _upload("a.exe", b"MZ"), 400),
    ("post", "/v1/files", _upload("a.jsonl", b'{"text": "fine text here, long enough"}\n{"txt": 1}\n'), 400),
    ("post", "/v1/files", _upload("a.jsonl", b'{"text": "tiny"}\n'), 422),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "new"}}, 404),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": "nope", "suffix": "new"}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "gpt-4o", "training_file": NO_FILE, "suffix": "new"}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "../x"}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "base"}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "auto"}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "medic"}}, 409),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": "f", "suffix": "n", "hyperparameters": {"n_epochs": 0}}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": "f", "suffix": "n", "hyperparameters": {"lr": 1}}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "new", "metadata": {"route_examples": 5}}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "new", "metadata": {f"k{i}": "v" for i in range(17)}}}, 400),
    ("post", "/v1/fine_tuning/jobs", {"json": {"model": "auto", "training_file": NO_FILE, "suffix": "new", "metadata": ["route_examples"]}}, 400),
    ("get", "/v1/fine_tuning/jobs/ftjob-nope", {}, 404),
    ("get", "/v1/fine_tuning/jobs/ftjob-nope/events", {}, 404),
    ("post", "/v1/fine_tuning/jobs/ftjob-nope/cancel", {}, 404),
    ("get", "/v1/fine_tuning/jobs?limit=0", {}, 400),
    # the dashboard's pages and data
    ("get", "/nothing.html", {}, 404),
    ("get", "/static/nope.js", {}, 404),
    ("get", "/static/..%2F__init__.py", {}, 404),
    ("get", "/ui/nothing", {}, 404),
    ("post", "/ui/stack", {}, 405),
    ("get", "/ui/jobs/ftjob-nope", {}, 404),
    ("get", "/ui/jobs/..%2F..%2Fmanifest.json", {}, 404),
    ("get", "/ui/jobs/ftjob-nope/series", {}, 404),
    ("get", "/ui/jobs/ftjob-nope/series?after=-1", {}, 400),
    ("get", "/ui/jobs/ftjob-nope/series?after=x", {}, 400),
    ("get", "/ui/plots/loss_matrix.png", {}, 404),
    ("get", "/ui/plots/..%2Fmanifest.json", {}, 404),
]  # fmt: skip


def test_bad_requests_get_openai_shaped_4xx_and_the_server_stays_healthy(http, client):
    assert len(BAD) >= 30
    for method, path, kwargs, status in BAD:
        response = getattr(http, method)(path, **kwargs)
        assert response.status_code == status, (path, kwargs.get("json"), response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    no_key = http.get("/v1/models", headers={"Authorization": ""})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    bad_line = http.post(
        "/v1/files", **_upload("d.jsonl", b'{"text": "a fine line of text"}\n{oops\n')
    )
    assert "d.jsonl:2: invalid JSON" in bad_line.json()["error"]["message"]
    assert http.get("/health").json()["status"] == "ok"
    assert chat(client, "auto", texts("code", 1, 1)[0], max_tokens=3).usage.completion_tokens == 3


def test_metrics_count_requests_tokens_routing_and_batches(http, client):
    chat(client, "auto", texts("money", 1, 8)[0], max_tokens=3)
    text = http.get("/metrics").text
    assert 'crma_requests_total{domain="money",endpoint="chat",model="auto",status="200"}' in text
    assert 'crma_completion_tokens_total{domain="money",model="auto"}' in text
    for name in (
        "crma_router_confidence_count",
        "crma_batch_size_count",
        "crma_queue_depth",
        "crma_time_to_first_token_seconds_count",
        'crma_fine_tuning_jobs{status="running"}',
    ):
        assert name in text


def test_full_queue_is_429_and_loading_is_503(stack_path):
    small = Server(stack_path, ServeSettings(max_queue=0), api_key=KEY)
    with app_client(small) as http:
        response = http.post("/v1/completions", json={"model": "auto", "prompt": "x"})
        assert (
            response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
        )
    loading = Server(stack_path, api_key=KEY)  # never started: its stack is not loaded
    from fastapi.testclient import TestClient

    from crma.serve.app import create_app

    cold = TestClient(create_app(loading), headers={"Authorization": f"Bearer {KEY}"})
    assert cold.get("/health").status_code == 503
    assert cold.get("/v1/models").json()["error"]["code"] == "loading"


# -- continuous batching: alone vs mixed --------------------------------------------------------
def _run(batcher: Batcher, specs: list[tuple], join_late: tuple | None = None) -> list[list]:
    """Submit requests (model, prompt, max_tokens, n); `join_late` is submitted once the
    first request has streamed text, so it joins a batch in flight. Events per request."""
    done = [threading.Event() for _ in range(len(specs) + (join_late is not None))]
    events: list[list] = [[] for _ in done]

    def request(i: int, model: str, prompt: str, max_tokens: int, n: int = 1) -> Request:
        def emit(event):
            events[i].append(event)
            if event[0] == "error" or sum(e[0] == "done" for e in events[i]) == n:
                done[i].set()
            if i == 0 and event[0] == "delta" and join_late and len(events[0]) == 2:
                batcher.submit(request(len(specs), *join_late))

        return Request(prompt, prompt, model, False, Sampling(max_tokens, 0.0), n, emit, 1e12)

    for i, spec in enumerate(specs):
        batcher.submit(request(i, *spec))
    return events, done


def _answers(events: list) -> dict[int, tuple]:
    return {e[1]: (e[4], e[3], e[2]) for e in events if e[0] == "done"}


@pytest.fixture(scope="module")
def sharp(stack_path):
    """The stack with attention made sharp: a tiny random model attends almost uniformly, so
    wrong positions or unmasked padding would hardly change its greedy tokens."""
    snapshot = Snapshot(load_stack(stack_path), ServeSettings())
    with torch.no_grad():
        for name, param in snapshot.engine.base.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and "lora" not in name:
                param.mul_(6.0)
    return snapshot


def test_greedy_tokens_identical_alone_and_in_a_mixed_continuous_batch(sharp, server):
    snapshot = sharp
    specs = [
        ("medic", texts("medic", 1, 21)[0], 60, 1),
        ("money", "bond", 9, 1),
        ("base", texts("code", 1, 22)[0], 14, 1),
        ("auto", texts("money", 1, 23)[0] + " " + texts("money", 1, 24)[0], 30, 2),
        ("code", "def add", 5, 1),
    ]
    late = ("auto", texts("code", 1, 25)[0], 20, 1)
    alone = []
    for spec in [*specs, late]:
        solo = Batcher(ServeSettings())
        solo.swap(snapshot)
        events, done = _run(solo, [spec])
        assert done[0].wait(60)
        alone.append(_answers(events[0]))
        solo.close()
    mixed = Batcher(ServeSettings(), server.metrics)
    events, done = _run(mixed, specs, join_late=late)  # queued before the model: one batch
    mixed.swap(snapshot)
    assert all(d.wait(60) for d in done)
    mixed.close()
    together = [_answers(e) for e in events]
    assert together == alone
    assert any(len(text) for answers in alone for text, _, _ in answers.values())
    steps = server.metrics.registry.get_sample_value("crma_batch_size_count")
    single = server.metrics.registry.get_sample_value("crma_batch_size_bucket", {"le": "1.0"})
    assert steps - single >= 20  # most steps decoded several rows (domains) at once


# -- fine-tuning jobs ---------------------------------------------------------------------------------
@pytest.fixture
def job_server(stack_path, tmp_path):
    copy = tmp_path / "stack"
    shutil.copytree(stack_path, copy, ignore=shutil.ignore_patterns("serve"))
    with app_client(Server(copy, ServeSettings(job_nice=0), api_key=KEY, train=JOB_TRAIN)) as http:
        yield (
            http,
            openai.OpenAI(
                base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0
            ),
        )


def _physics_file(client, n: int = 40):
    rows = [json.dumps({"text": t}) for t in texts("physics", n, 1)]
    rows.append(rows[0])  # the optimizer drops the duplicate
    return client.files.create(
        file=("physics.jsonl", "\n".join(rows).encode()), purpose="fine-tune"
    )


def test_cancel_a_running_job(job_server):
    http, client = job_server
    upload = _physics_file(client)
    report = upload.model_extra["crma"]
    assert report["rows"] == 40 and report["cleaning"]["removed"] == {"exact_duplicate": 1}
    assert report["contamination"]["contaminated"] == 0
    again = _physics_file(client)  # the same rows again: all contaminated by the first upload
    assert again.model_extra["crma"]["contamination"]["contaminated"] == 40
    job = client.fine_tuning.jobs.create(
        model="auto",
        training_file=upload.id,
        suffix="physics",
        hyperparameters={"n_epochs": 1000, "batch_size": 2},
    )
    with pytest.raises(openai.ConflictError):  # in use by a job in flight
        client.files.delete(upload.id)
    with pytest.raises(openai.ConflictError):  # the suffix is taken by the job in flight
        client.fine_tuning.jobs.create(model="auto", training_file=upload.id, suffix="physics")
    wait_for(
        lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id)),
        120,
        "the first training step",
        every=0.3,
    )
    client.fine_tuning.jobs.cancel(job.id)
    wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status == "cancelled", 60, "the cancel"
    )
    assert "physics" not in [m.id for m in client.models.list()]
    assert not (http.app.state.server.stack / "checkpoint").exists()
    assert chat(client, "auto", "hello", max_tokens=2).usage.completion_tokens == 2
    assert client.files.delete(upload.id).deleted


def test_a_job_stores_its_route_examples_and_auto_routes_their_style_to_it(job_server):
    http, client = job_server
    upload = _physics_file(client)
    questions = [json.dumps({"text": t}) for t in texts("asking", 24, 1)]
    ask = client.files.create(
        file=("ask.jsonl", "\n".join(questions).encode()), purpose="fine-tune"
    )
    for bad, error in (("nope", openai.BadRequestError), (NO_FILE, openai.NotFoundError)):
        with pytest.raises(error, match="route_examples"):
            client.fine_tuning.jobs.create(
                model="auto",
                training_file=upload.id,
                suffix="physics",
                metadata={"route_examples": bad},
            )
    job = client.fine_tuning.jobs.create(
        model="auto",
        training_file=upload.id,
        suffix="physics",
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        seed=7,
        metadata={"route_examples": ask.id, "team": "lab"},
    )
    assert job.metadata == {"route_examples": ask.id, "team": "lab"}
    with pytest.raises(openai.ConflictError):  # in use by the job in flight
        client.files.delete(ask.id)
    done = wait_for(
        lambda: (
            (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j
        ),
        180,
        "the job to finish",
        every=0.3,
    )
    assert done.status == "succeeded", done.error
    manifest = json.loads((http.app.state.server.stack / "manifest.json").read_text())
    assert manifest["router"]["route_examples"] == {"physics": 24}
    # without the route examples these questions go to another domain (checked once by hand)
    for text in texts("asking", 4, 2):
        assert chat(client, "auto", text, max_tokens=1).model == "physics"
    assert client.files.delete(ask.id).deleted


def test_a_store_written_before_jobs_kept_metadata_opens_and_keeps_its_jobs(tmp_path):
    import sqlite3

    from crma.serve.store import SCHEMA, Store

    path = tmp_path / "serve.db"
    with sqlite3.connect(path) as old:
        old.executescript(SCHEMA.replace(", metadata TEXT", ""))
        old.execute(
            "INSERT INTO jobs (id, hyperparameters, status) VALUES ('ftjob-a', '{}', 'queued')"
        )
    store = Store(path)
    assert store.job("ftjob-a")["metadata"] is None
    job = {"id": "ftjob-b", "model": "auto", "training_file": NO_FILE, "suffix": "b"}
    store.add_job(job | {"hyperparameters": {}, "seed": 1, "metadata": {"team": "lab"}})
    assert store.job("ftjob-b")["metadata"] == {"team": "lab"}
    assert [j["id"] for j in store.jobs()] == ["ftjob-b", "ftjob-a"]
