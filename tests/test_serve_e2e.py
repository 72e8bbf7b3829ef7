"""`crma serve` as a real process: answers over HTTP, and a job survives a SIGKILL of the server
to end with the same stack as `crma train` run without interruption."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import openai
import pytest
from helpers import ROOT, TINY_BASE, crma_cmd, crma_env
from safetensors.torch import load_file
from serving import KEY, free_port, serve_process, wait_for
from stacks import build_stack, texts

EPOCHS, BATCH = 4, 2


@pytest.mark.integration
def test_serve_process_sigkill_mid_job_resumes_to_the_uninterrupted_stack(tmp_path):
    stack, twin, data = tmp_path / "stack", tmp_path / "twin", tmp_path / "physics.jsonl"
    build_stack(stack, ["medic", "money"])
    shutil.copytree(stack, twin)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts("physics", 30, 2)))
    # The same domain trained by `crma train` without interruption, meanwhile.
    straight = subprocess.Popen(
        crma_cmd(
            "train", str(twin), "--base", str(TINY_BASE), "--domain", f"physics={data}",
            "--seed", "7", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "0.03",
            "--max-length", "32", "--precision", "fp32", "--checkpoint-every", "5",
        ),
        cwd=ROOT, env=crma_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _serve_kill_and_resume(stack, data)
        assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    finally:
        if straight.poll() is None:
            straight.kill()
    for name in ("adapters/physics/adapter_model.safetensors", "crma_backbone.safetensors"):
        resumed, uninterrupted = load_file(str(stack / name)), load_file(str(twin / name))
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert (resumed[key] == uninterrupted[key]).all(), (name, key)


def _serve_kill_and_resume(stack, data) -> None:
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    with serve_process(stack, port) as proc:
        answer = client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": texts("money", 1, 5)[0]}],
            max_tokens=4,
            temperature=0,
        )
        assert answer.model == "money" and answer.usage.completion_tokens == 4
        upload = client.files.create(file=("physics.jsonl", data.read_bytes()), purpose="fine-tune")
        assert upload.model_extra["crma"]["rows"] == 30  # the optimizer kept every row
        job = client.fine_tuning.jobs.create(
            model="auto",
            training_file=upload.id,
            suffix="physics",
            hyperparameters={"n_epochs": EPOCHS, "batch_size": BATCH},
            seed=7,
        )
        assert job.status == "queued" and job.hyperparameters.n_epochs == EPOCHS
        wait_for(lambda: _steps(client, job.id) >= 7, 120, "step 7", every=0.05)
        proc.kill()  # SIGKILL: no cleanup; the worker follows its parent
    with serve_process(stack, port):
        done = wait_for(
            lambda: (
                (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed")
                and j
            ),
            180,
            "the resumed job to finish",
            every=0.3,
        )
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == "physics"
        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        metrics = [e for e in events if e.type == "metrics"]
        steps = math.ceil(EPOCHS * 30 / BATCH)
        assert sorted(e.data["step"] for e in metrics) == list(range(1, steps + 1))
        for key in ("train_loss", "learning_rate", "grad_norm", "grad_norm_clipped"):
            assert isinstance(metrics[0].data[key], float)
        assert metrics[0].data["spectral_norm_max"] == pytest.approx(1.0, abs=1e-4)
        assert any("resumes" in e.message for e in events)
        assert [j.id for j in client.fine_tuning.jobs.list(limit=1).data] == [job.id]
        assert "physics" in [m.id for m in client.models.list()]
        routed = client.completions.create(
            model="auto", prompt=texts("physics", 1, 77)[0], max_tokens=2, temperature=0
        )
        assert routed.model == "physics"
        with pytest.raises(openai.ConflictError):  # now a domain of the stack
            client.fine_tuning.jobs.create(model="auto", training_file=upload.id, suffix="physics")


def _steps(client: openai.OpenAI, job_id: str) -> int:
    events = client.fine_tuning.jobs.list_events(job_id, limit=5).data
    return max((e.data["step"] for e in events if e.type == "metrics"), default=0)
