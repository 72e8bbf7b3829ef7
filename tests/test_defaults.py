"""The package defaults are the long protocol's settings, chosen on validation, and the
presets train crma at the settings their own protocol chose."""

import json
from pathlib import Path

import pytest
import yaml

from crma import tune
from crma.backbone import CRMAConfig
from crma.protocol.config import load_config, method_settings
from crma.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
LRS = ("lr_projections", "lr_mix", "lr_gate")
LONG_GRID = yaml.safe_load((ROOT / "configs/tuning/long-crma.yaml").read_text())


def backbone_rates(label: str) -> dict[str, float]:
    """The backbone rates the long protocol's grid ran `label` at."""
    config = next(c for _, c in tune.trial_configs(LONG_GRID) if c.methods[0].key == label)
    backbone = method_settings(config, config.methods[0])[0].crma
    return {key: getattr(backbone, key) for key in LRS}


def paper_choice(label: str) -> dict[str, float]:
    """A condition's CRMA learning rates chosen for the paper protocol."""
    results = json.loads((ROOT / "results/tuning/paper-crma.json").read_text())
    return {key: float(results["selected_entries"][label]["crma"][key]) for key in LRS}


def test_crma_config_defaults_are_the_long_protocols_rates():
    config = CRMAConfig()
    assert {key: getattr(config, key) for key in LRS} == backbone_rates("crma")


def test_train_default_lr_is_crmas_rate_in_the_published_long_runs():
    """`crma train` and the Python API train crma's LoRA at the rate of the long protocol's
    published runs, so the defaults reproduce the headline; a new validation choice becomes
    the default when the holdout runs at it are published."""
    published = load_config(ROOT / "results/long/config.yaml")
    crma = next(spec for spec in published.methods if spec.key == "crma")
    assert method_settings(published, crma)[1].lr == TrainConfig().lr


@pytest.mark.parametrize(
    ("preset", "chosen"),
    [
        ("paper", paper_choice),
        ("baselines", paper_choice),
        ("long", backbone_rates),
        ("demo", backbone_rates),
    ],
)
def test_presets_train_crma_at_the_validated_rates(preset, chosen):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    crma_like = [spec for spec in config.methods if spec.name in ("crma", "crma-task1")]
    assert crma_like, f"{preset} has no CRMA condition"
    for spec in crma_like:
        backbone = method_settings(config, spec)[0].crma
        label = "crma-tied" if backbone.variant == "tied" else "crma"
        assert {key: getattr(backbone, key) for key in LRS} == chosen(label), spec.key


def test_demo_trains_crma_at_the_long_protocols_rate():
    """The demo is the long protocol shrunk: its crma learns at long.yaml's validated rate."""
    rates = {}
    for preset in ("demo", "long"):
        config = load_config(ROOT / "configs" / f"{preset}.yaml")
        crma = next(spec for spec in config.methods if spec.key == "crma")
        rates[preset] = method_settings(config, crma)[1].lr
    assert rates["demo"] == rates["long"]
