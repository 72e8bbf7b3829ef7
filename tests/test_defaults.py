"""The package defaults are the settings the validation split chose, and the presets use them."""

import json
from pathlib import Path

import pytest

from crma.backbone import CRMAConfig
from crma.protocol.config import load_config, method_settings
from crma.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
LRS = ("lr_projections", "lr_mix", "lr_gate")


def chosen(label: str) -> dict[str, float]:
    """A condition's selected CRMA learning rates in the committed tuning result."""
    selected = json.loads((ROOT / "results/tuning/paper-crma.json").read_text())["selected"]
    pairs = (item.split("=") for item in selected[label].split(","))
    return {key: float(value) for key, value in pairs}


def test_crma_config_defaults_are_the_validated_rates():
    config = CRMAConfig()
    assert {key: getattr(config, key) for key in LRS} == chosen("crma")


def test_train_default_lr_is_crmas_validated_lora_rate():
    """`crma train` and the Python API train crma's LoRA at the rate the long protocol chose.

    The paper protocol's grid (paper-crma) chooses its own rate, which configs/paper.yaml sets.
    """
    selected = json.loads((ROOT / "results/tuning/long-crma.json").read_text())["selected"]
    assert selected["crma"] == f"lr={TrainConfig().lr}"


@pytest.mark.parametrize("preset", ["paper", "long", "baselines", "demo"])
def test_presets_train_crma_at_the_validated_rates(preset):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    crma_like = [spec for spec in config.methods if spec.name in ("crma", "crma-task1")]
    assert crma_like, f"{preset} has no CRMA condition"
    for spec in crma_like:
        backbone = method_settings(config, spec)[0].crma
        label = "crma-tied" if backbone.variant == "tied" else "crma"
        assert {key: getattr(backbone, key) for key in LRS} == chosen(label), spec.key
