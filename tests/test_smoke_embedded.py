"""A few steps end to end on the real embedded model: train two domains, then generate routed."""

from __future__ import annotations

import json

import pytest
from helpers import run_crma

MEDICAL = [
    "The heart pumps blood through the arteries and veins of the circulatory system.",
    "Insulin lowers blood glucose by moving sugar from the blood into the cells.",
    "An aneurysm is an abnormal bulge in the wall of a blood vessel.",
    "Anemia is a shortage of red blood cells or of haemoglobin in the blood.",
]
CODE = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "import os\npath = os.path.join('data', 'train.jsonl')",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
]


@pytest.mark.slow
@pytest.mark.integration
def test_train_two_domains_and_generate_on_the_embedded_model(tmp_path):
    files = {}
    for name, texts in (("medical", MEDICAL), ("code", CODE)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stack = tmp_path / "stack"
    fast = ["--max-steps", "2", "--batch-size", "2", "--max-length", "32"]
    for name in ("medical", "code"):
        run_crma("train", str(stack), "--domain", f"{name}={files[name]}", *fast)
    manifest = json.loads((stack / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["medical", "code"]
    assert all(d["steps"] == 2 for d in manifest["domains"])
    proc = run_crma(
        "generate", str(stack), "def multiply(a, b):", "--max-new-tokens", "8", "--domain", "auto"
    )
    assert proc.stdout.strip(), "a non-empty generation"
    assert "code" in proc.stderr, f"routed to the code adapter: {proc.stderr[-300:]}"
