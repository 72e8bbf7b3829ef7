"""One validation mechanism for every settings class: the Python API, YAML and the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from crma import UserError
from crma.backbone import CRMAConfig
from crma.methods import METHODS
from crma.settings import SettingError, Settings, add_arguments, from_args, from_dict
from crma.train import TrainConfig


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(max_steps=-3), "TrainConfig.max_steps: expected an integer >= 1, got -3"),
        (lambda: TrainConfig(lr=float("nan")), "TrainConfig.lr: expected a finite number > 0, got nan"),
        (lambda: TrainConfig(batch_size=4, grad_accum=8), "TrainConfig.grad_accum: expected at most batch_size (4), got 8"),
        (lambda: dataclasses.replace(TrainConfig(), epochs=0), "TrainConfig.epochs: expected a finite number > 0, got 0"),
        (lambda: CRMAConfig(variant="loose"), "CRMAConfig.variant: expected one of untied, tied, got 'loose'"),
        (lambda: CRMAConfig(n_streams=True), "CRMAConfig.n_streams: expected an integer >= 1, got True"),
    ],
)  # fmt: skip
def test_the_python_api_checks_every_instance(make, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        make()


def test_numbers_are_coerced_and_yaml_names_the_section_and_key():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert from_dict(TrainConfig, {"lr": "1e-4"}, "x.yaml: train").lr == 1e-4
    with pytest.raises(
        UserError, match=re.escape("x.yaml: train: lr: expected a finite number > 0, got -1")
    ):
        from_dict(TrainConfig, {"lr": -1}, "x.yaml: train")


def test_flags_are_named_as_typed_and_help_shows_what_is_allowed():
    parser = argparse.ArgumentParser()
    add_arguments(parser, CRMAConfig, prefix="crma_")
    assert "(default: 4; >= 1)" in " ".join(parser.format_help().split())
    with pytest.raises(
        UserError, match=re.escape("--crma-n-streams: expected an integer >= 1, got 0")
    ):
        from_args(CRMAConfig, parser.parse_args(["--crma-n-streams", "0"]), prefix="crma_")


def test_every_settings_class_and_method_option_uses_the_mechanism():
    import crma.data.clean as clean
    import crma.engine as engine
    import crma.eval.qa as qa
    import crma.generate as generate
    import crma.protocol.config as protocol
    import crma.routing.router as router

    classes = [TrainConfig, CRMAConfig, engine.LoraSettings, router.RouteSettings]
    classes += [
        generate.GenerateSettings,
        qa.QASettings,
        clean.CleanConfig,
        clean.CheckSettings,
    ]
    classes += [protocol.RunConfig, protocol.MethodSpec, protocol.DomainSpec, protocol.EvalConfig]
    classes += [protocol.CorpusSpec, *(m.Options for m in METHODS.values())]
    assert all(issubclass(cls, Settings) for cls in classes)
