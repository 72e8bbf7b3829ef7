"""The run config: its schema (dataclasses, checked on load), overrides, and the settings that
decide one (method, seed) unit's results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from crma.backbone import CRMAConfig
from crma.continual import StackSpec
from crma.data.corpus import DOMAINS as CORPUS_DOMAINS
from crma.engine import LoraSettings
from crma.errors import UserError
from crma.methods import METHODS, make_method
from crma.model import EMBEDDED
from crma.quantize import LoadIn
from crma.settings import Settings, from_dict, setting
from crma.stack import name_problem
from crma.train import TrainConfig, result_settings


def _path_problem(path: str) -> str | None:
    return None if path.strip() else "a file path"


def _method_problem(name: str) -> str | None:
    return None if name in METHODS else "one of " + ", ".join(METHODS)


@dataclass
class DomainSpec(Settings):
    """A user domain: training file and held-out file (any format `crma.data` loads)."""

    name: str = setting("", "domain name", check=name_problem)
    train: str = setting("", "training file", check=_path_problem)
    holdout: str = setting("", "held-out file for the loss matrix", check=_path_problem)


@dataclass
class MethodSpec(Settings):
    """A condition of the protocol: a method and, optionally, its own settings."""

    name: str = setting("crma", "method: " + ", ".join(METHODS), check=_method_problem)
    label: str | None = setting(
        None,
        "name in the report and of its folder (default: the method name)",
        check=lambda label: name_problem(label, reserved=("plots",)),
    )
    options: dict[str, Any] = setting({}, "method options")
    crma: dict[str, Any] = setting({}, "CRMA settings overriding the run's")
    lora: dict[str, Any] = setting({}, "LoRA settings overriding the run's")
    train: dict[str, Any] = setting({}, "training settings overriding the run's")

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class CorpusSpec(Settings):
    """The embedded five-domain corpus (used when `domains` is empty)."""

    order: list[Literal[CORPUS_DOMAINS]] = setting(
        list(CORPUS_DOMAINS), "domains in training order"
    )
    train_size: int = setting(
        500, "training examples per domain (first N of the train split)", ge=1
    )
    holdout_size: int = setting(
        100, "held-out examples per domain (first N of the holdout split)", ge=1
    )
    split: Literal["holdout", "validation"] = setting(
        "holdout", "evaluate on 'holdout' or on 'validation' (carved from spare, for tuning)"
    )


@dataclass
class EvalConfig(Settings):
    """Evaluation of the loss matrix."""

    batch_size: int = setting(8, "examples per forward pass", ge=1)
    max_length: int | None = setting(
        None, "tokens per held-out example (default: train.max_length)", ge=2
    )
    future_domains: bool = setting(
        True,
        "also evaluate domains not trained yet (the upper triangle of the loss matrix); "
        "drift, advantage and plasticity never use it, so false saves ~40% of evaluation",
    )
    routing: bool = setting(
        False, "after each method/seed: router top-1 and confusion on the holdouts (routing.json)"
    )
    routers: list[Literal["centroid", "fast", "arrow", "loss"]] = setting(
        ["centroid"], "routers for eval.routing: centroid, fast (the serving router), arrow, loss"
    )
    qa: bool = setting(
        False, "after each method/seed: QA accuracy, base/oracle/routed/backbone off (qa.json)"
    )
    qa_probes: int = setting(100, "continuation probes per domain for eval.qa", ge=0)
    qa_mmlu: int = setting(100, "MMLU questions per domain for eval.qa", ge=0)
    route_questions: int = setting(
        0,
        "per embedded-corpus domain, store this many of its MMLU questions that QA never "
        "scores in its router entry (route examples, as `crma train --route-examples`): "
        "routing and routed QA then measure a router that has seen questions, not only passages "
        "(100 chosen on validation: scripts/tune_route_questions.py)",
        ge=0,
    )


@dataclass
class RunConfig(Settings):
    """A protocol run."""

    base: str = setting(
        EMBEDDED,
        "base model: 'embedded', a HF folder or hub name, or a .gguf file",
        check=_path_problem,
    )
    load_in: LoadIn = setting(
        "float", "base weights: float, or 8bit / 4bit quantized by bitsandbytes (CUDA GPUs only)"
    )
    methods: list[MethodSpec] = setting([], "conditions to compare")
    seeds: list[int] = setting(
        [0], "seeds; each method runs once per seed on identical data", ge=0, lt=2**32
    )
    domains: list[DomainSpec] = setting(
        [], "user domains in training order (empty: embedded corpus)"
    )
    corpus: CorpusSpec = dataclasses.field(default_factory=CorpusSpec)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    crma: CRMAConfig = dataclasses.field(default_factory=CRMAConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def read_yaml(path: Path, kind: str) -> Any:
    """A YAML file's content; a missing file or invalid YAML is a one-line error naming the
    file (and the line)."""
    if not path.is_file():
        raise UserError(f"{path}: {kind} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, and check every key."""
    path = Path(path)
    data = read_yaml(path, "config") or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    for item in overrides:
        _apply_override(data, item)
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], where: str) -> RunConfig:
    data = dict(data)
    methods = [
        _method_spec(m, f"{where}: methods[{i}]")
        for i, m in enumerate(data.pop("methods", None) or [])
    ]
    domains = [
        from_dict(DomainSpec, d, f"{where}: domains[{i}]")
        for i, d in enumerate(data.pop("domains", None) or [])
    ]
    sections = {
        key: from_dict(cls, data.pop(key, None), f"{where}: {key}")
        for key, cls in (
            ("corpus", CorpusSpec),
            ("train", TrainConfig),
            ("lora", LoraSettings),
            ("crma", CRMAConfig),
            ("eval", EvalConfig),
        )
    }
    config = from_dict(RunConfig, data, where)
    config = dataclasses.replace(config, methods=methods, domains=domains, **sections)
    if not config.methods:
        raise UserError(f"{where}: methods: list at least one method ({', '.join(METHODS)})")
    labels = [m.key for m in config.methods]
    if len(set(labels)) != len(labels):
        raise UserError(
            f"{where}: methods: labels must be unique (got {labels}); set `label:` to tell them apart"
        )
    for spec in config.methods:  # fail now, not hours into the run
        make_method(spec.name, spec.options, f"{where}: methods[{spec.key}]")
        method_settings(config, spec)
    if not config.seeds:
        raise UserError(f"{where}: seeds: list at least one seed")
    n_domains = len(config.domains) or len(config.corpus.order)
    if n_domains < 2:
        key = "domains" if config.domains else "corpus.order"
        raise UserError(
            f"{where}: {key}: list at least two domains (drift is measured on the earlier ones)"
        )
    names = [d.name for d in config.domains]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: domains: every name once (got {', '.join(names)})")
    return config


def _method_spec(item: Any, where: str) -> MethodSpec:
    return from_dict(MethodSpec, {"name": item} if isinstance(item, str) else item, where)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. train.max_steps=10")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: {part} is not a section")
    node[parts[-1]] = value


def resolved(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def method_settings(config: RunConfig, spec: MethodSpec) -> tuple[StackSpec, TrainConfig]:
    where = f"methods[{spec.key}]"

    def merge(cls, base, extra, name):
        return from_dict(cls, {**dataclasses.asdict(base), **extra}, f"{where}.{name}")

    stack_spec = StackSpec(
        method=spec.name,
        method_options=spec.options,
        lora=merge(LoraSettings, config.lora, spec.lora, "lora"),
        crma=merge(CRMAConfig, config.crma, spec.crma, "crma"),
    )
    return stack_spec, merge(TrainConfig, config.train, spec.train, "train")


def unit_settings(config: RunConfig, spec: MethodSpec) -> dict[str, Any]:
    """Everything that decides one method's results on a seed, whatever else the run holds."""
    data = resolved(config)
    for key in ("methods", "seeds", "train", "lora", "crma"):
        del data[key]
    # Routing and QA evaluations add files (made when missing); they change no loss.
    data["eval"] = {k: data["eval"][k] for k in ("batch_size", "max_length", "future_domains")}
    stack_spec, train_cfg = method_settings(config, spec)
    stack = stack_spec.to_manifest()
    if not METHODS[spec.name].uses_crma:
        del stack["crma"]  # settings of a backbone the method does not have
    # Options as the method reads them: an option left out equals its default written out.
    stack["method_options"] = dataclasses.asdict(make_method(spec.name, spec.options).options)
    data["method"] = {"name": spec.name, "stack": stack, "train": result_settings(train_cfg)}
    return data
