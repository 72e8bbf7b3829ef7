"""Model loading: the embedded default and clear errors for bad paths."""

import tempfile
from pathlib import Path

import pytest
import torch

from crma import UserError, load_base
from crma.cli import main

PARAGRAPH = (
    "The heart is a muscular organ found in most animals. It pumps blood through the blood "
    "vessels of the circulatory system, supplying oxygen and nutrients to the tissues and "
    "removing carbon dioxide and other wastes."
)


@pytest.mark.slow
def test_embedded_model_loads_and_is_sane():
    model, tokenizer = load_base("embedded")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == PARAGRAPH
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0, f"mean token loss {loss:.2f} nats: dequantization looks wrong"


def test_missing_paths_fail_with_one_line(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        load_base(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(UserError, match="model folder not found"):
        load_base(str(tmp_path / "missing" / "model"))


def test_corrupt_gguf_and_unknown_architecture(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UserError, match="bad.gguf: cannot load GGUF model"):
        load_base(str(bad))
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(UserError, match="weird: cannot load model"):
        load_base(str(folder))


def test_cli_reports_bad_model_path_with_exit_2(tmp_path, capsys):
    assert main(["demo", "--base", str(tmp_path / "nope.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crma: error:") and "nope.gguf" in err and err.count("\n") == 1


def test_the_suite_writes_to_a_temporary_crma_home_and_reads_the_users_builds(crma_home):
    """conftest's isolation: every write goes below a temporary CRMA_HOME (subprocesses too);
    only finished model and corpus builds are linked in from the user's cache."""
    from helpers import crma_env

    from crma.model import crma_home as home_in_use

    assert home_in_use() == crma_home and crma_env()["CRMA_HOME"] == str(crma_home)
    assert crma_home.is_relative_to(Path(tempfile.gettempdir()))
    for link in crma_home.glob("*/*"):
        assert link.is_symlink() and not link.resolve().is_relative_to(crma_home.resolve())
