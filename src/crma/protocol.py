"""`crma run`: methods × seeds × domains on identical data, with the loss matrix after every stage.

Run directory (DESIGN §6): config.yaml (resolved), report.json, report.md, plots/, and per
method and seed: loss_matrix.json, metrics.jsonl, stack/. Everything is resumable: a stage
whose domain the stack lists is not retrained, a loss-matrix row on disk is not recomputed,
and evaluations whose weights are unchanged (same fingerprint) are reused, not rerun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from crma.adapter import CRMAConfig
from crma.continual import ContinualModel, StackSpec
from crma.data.corpus import DOMAINS as CORPUS_DOMAINS
from crma.distributed import make_accelerator, refuse_unsupported
from crma.engine import LoraSettings
from crma.errors import UserError
from crma.evaluate import mean_token_loss
from crma.fileio import atomic_path, is_temporary, write_json, write_text
from crma.lock import LOCK_FILE, WriterLock
from crma.methods import METHODS, make_method
from crma.model import EMBEDDED, base_model_id, load_base
from crma.provenance import data_identity, recorded_data
from crma.quantize import LoadIn, quantization_config
from crma.settings import Settings, from_dict, setting
from crma.stack import name_problem
from crma.train import TrainConfig, mixed_precision, result_settings

log = logging.getLogger(__name__)


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
    routers: list[Literal["centroid", "arrow", "loss"]] = setting(
        ["centroid"], "routers for eval.routing: centroid, arrow, loss"
    )
    qa: bool = setting(
        False, "after each method/seed: QA accuracy, base/oracle/routed/backbone off (qa.json)"
    )
    qa_probes: int = setting(100, "continuation probes per domain for eval.qa", ge=0)
    qa_mmlu: int = setting(100, "MMLU questions per domain for eval.qa", ge=0)


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


# -- configuration ------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, and check every key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
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


# -- data -------------------------------------------------------------------------------------
@dataclass
class DomainData:
    name: str
    train: list[dict[str, list[int]]]
    holdout: list[dict[str, list[int]]]
    info: dict[str, Any]


def load_domains(config: RunConfig, tokenizer) -> list[DomainData]:
    """Tokenized train/holdout per domain: the user's files, or the embedded corpus."""
    from crma.data import corpus_file, ensure_corpus, load_records, tokenize_records

    cfg = config.train
    eval_len = config.eval.max_length or cfg.max_length
    if config.domains:
        specs = [(d.name, Path(d.train), Path(d.holdout), None, None) for d in config.domains]
    else:
        root = ensure_corpus()
        c = config.corpus
        specs = [
            (
                name,
                corpus_file(name, "train", root),
                corpus_file(name, c.split if c.split == "holdout" else "spare", root),
                c.train_size,
                c.holdout_size,
            )
            for name in c.order
        ]
    out = []
    for name, train_path, holdout_path, n_train, n_holdout in specs:
        train = load_records(train_path)[:n_train]
        holdout = load_records(holdout_path)[:n_holdout]
        out.append(
            DomainData(
                name,
                tokenize_records(train, tokenizer, cfg.max_length),
                tokenize_records(holdout, tokenizer, eval_len),
                {"train_file": str(train_path), "train_examples": len(train)},
            )
        )
    return out


# -- the run ------------------------------------------------------------------------------------
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


class ProtocolRun:
    def __init__(
        self,
        config: RunConfig,
        out: str | Path,
        model_loader=None,
        reuse: list[str | Path] = (),
    ):
        self.config, self.out = config, Path(out)
        self.reuse = [Path(r) for r in reuse]
        self._caches_merged: set[Path] = set()  # reuse runs whose eval cache is merged already
        self.model_loader = model_loader or (lambda: load_base(config.base, load_in=config.load_in))
        self.cache_path = self.out / "eval_cache.json"
        self.data: dict[str, Any] = {}  # what the results are computed on, once it is read

    def run(self) -> dict[str, Any]:
        quantization_config(self.config.load_in, self.config.base)  # before any work
        acc = make_accelerator(mixed_precision(self.config.train.precision))
        for spec in self.config.methods:
            refuse_unsupported(METHODS[spec.name], acc)
        self._refuse_other_config()
        with WriterLock(self.out) if acc.is_main_process else nullcontext():
            return self._run(acc)

    def _run(self, acc) -> dict[str, Any]:
        from crma.report import build_report

        base_id = base_model_id(self.config.base)
        model, tokenizer = self.model_loader()
        for spec in self.config.methods:  # settings the model cannot take fail before any write
            method_settings(self.config, spec)[0].check_model(model)
        domains = load_domains(self.config, tokenizer)
        self.data = data_identity(self.config.domains)  # the files exist: load_domains read them
        self._write_config(acc)
        cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        units = [(spec, seed) for seed in self.config.seeds for spec in self.config.methods]
        clock = _Clock(total=len(units) * len(domains))
        for spec, seed in units:
            if acc.is_main_process:
                self._reuse(spec, seed, len(domains), cache)
            acc.wait_for_everyone()
            if not acc.is_main_process and self.cache_path.is_file():
                # the main process's cache: every process must skip the same evaluations
                cache.update(json.loads(self.cache_path.read_text()))
            self._run_one(spec, seed, domains, base_id, acc, cache, clock)
        report = None
        if acc.is_main_process:
            report = build_report(self.out)
        acc.wait_for_everyone()
        return report

    def _reuse(self, spec: MethodSpec, seed: int, n_domains: int, cache: dict[str, Any]) -> None:
        """Copy a finished (method, seed) from a `reuse` run whose settings for it are identical,
        and that run's evaluation cache (keyed by weight fingerprints, valid under the same
        data and eval settings, which identical settings imply).

        Same settings, seed and machine give the same numbers (the resume test checks this),
        so rerunning it would only cost time. A label only names a condition: a unit stored
        there under another label with identical settings is copied too (same label first).
        """
        target = self.out / spec.key / f"seed-{seed}"
        if target.exists():
            return
        wanted = unit_settings(self.config, spec)
        for other in self.reuse:
            if not (other / "config.yaml").is_file():
                continue
            theirs = load_config(other / "config.yaml")
            if seed not in theirs.seeds:
                continue
            twins = [m.key for m in theirs.methods if unit_settings(theirs, m) == wanted]
            for key in sorted(twins, key=lambda k: k != spec.key):
                source = other / key / f"seed-{seed}"
                if not self._finished(source, n_domains):
                    continue
                if (data := recorded_data(source, not theirs.domains)) not in (self.data, None):
                    print(
                        f"[{spec.key} seed {seed}] not reused from {source}: other data "
                        f"({json.dumps(data)})",
                        flush=True,
                    )
                    continue
                self._copy(source, target, other, cache)
                print(f"[{spec.key} seed {seed}] reused from {source} (same settings)", flush=True)
                return

    @staticmethod
    def _finished(unit: Path, n_domains: int) -> bool:
        matrix = unit / "loss_matrix.json"
        return (
            matrix.is_file() and len(json.loads(matrix.read_text())["loss_matrix"]) == n_domains + 1
        )

    def _copy(self, source: Path, target: Path, other: Path, cache: dict[str, Any]) -> None:
        with atomic_path(target) as tmp:
            shutil.copytree(source, tmp)
        if other not in self._caches_merged and (other / "eval_cache.json").is_file():
            theirs_cache = json.loads((other / "eval_cache.json").read_text())
            cache.update({k: v for k, v in theirs_cache.items() if k not in cache})
            write_json(self.cache_path, cache)
            self._caches_merged.add(other)

    def _check_exported(self, spec: MethodSpec, run_dir: Path) -> None:
        """A finished unit without its weights (`crma export`) must hold every configured eval."""
        if missing := missing_evals(self.config, spec, run_dir):
            raise UserError(
                f"{run_dir}: finished without its weights (stack/) and lacks {', '.join(missing)}; "
                "evaluating those needs the weights: reuse the full run, or delete this folder to retrain"
            )

    def _refuse_other_config(self) -> None:
        """The run directory must be this run's (same config), or new: nothing else in it."""
        path = self.out / "config.yaml"
        # Parsed, so a setting added since that run was made reads as its default there.
        if path.is_file() and resolved(load_config(path)) != resolved(self.config):
            raise UserError(
                f"{path}: this run directory holds a different config; use another --out or the same config"
            )
        other = (
            [p.name for p in self.out.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name)]
            if self.out.is_dir() and not path.is_file()
            else []
        )
        if other:
            raise UserError(
                f"{self.out}: exists and is not a crma run directory (no config.yaml, holds "
                f"{sorted(other)[0]!r}); use a new or empty --out"
            )

    def _write_config(self, acc) -> None:
        if acc.is_main_process:
            write_text(
                self.out / "config.yaml", yaml.safe_dump(resolved(self.config), sort_keys=False)
            )
        acc.wait_for_everyone()

    def _run_one(
        self, spec: MethodSpec, seed: int, domains: list[DomainData], base_id, acc, cache, clock
    ) -> None:
        run_dir = self.out / spec.key / f"seed-{seed}"
        if not (run_dir / "stack").exists() and self._finished(run_dir, len(domains)):
            self._check_exported(spec, run_dir)  # results without weights: reported as they are
            for _ in domains:
                clock.skip()
            return
        stack_spec, train_cfg = method_settings(self.config, spec)
        cm = ContinualModel.open_or_create(
            run_dir / "stack", self.model_loader, base_id, stack_spec
        )
        cm.tidy(acc)
        names = [d.name for d in domains]
        matrix_path = run_dir / "loss_matrix.json"
        rows = json.loads(matrix_path.read_text())["loss_matrix"] if matrix_path.is_file() else []
        data = recorded_data(run_dir, not self.config.domains) if rows else None
        if data not in (self.data, None):
            raise UserError(
                f"{matrix_path}: computed on other data ({json.dumps(data)}, now "
                f"{json.dumps(self.data)}); use another --out"
            )
        run_info = {"method": spec.key, "seed": seed}

        def evaluate_row(trained: int) -> list[float | None]:
            """Row `trained` of the loss matrix; row 0 (the base) is always complete."""
            row = []
            for i, d in enumerate(domains):
                if 0 < trained <= i and not self.config.eval.future_domains:
                    row.append(None)
                    continue
                adapters = cm.method.eval_adapters(d.name)
                key = f"{d.name}:{cm.engine.fingerprint(adapters)}"
                if key not in cache:
                    cache[key] = mean_token_loss(
                        cm.engine, d.holdout, adapters, self.config.eval.batch_size, acc
                    )
                    if acc.is_main_process:
                        write_json(self.cache_path, cache)
                row.append(cache[key])
            return row

        def save_rows() -> None:
            if acc.is_main_process:
                write_json(
                    matrix_path,
                    {
                        "domains": names,
                        "seed": seed,
                        "method": spec.key,
                        "data": self.data,
                        "loss_matrix": rows,
                    },
                )

        if not rows:
            rows.append(evaluate_row(0))
            save_rows()
        for k, d in enumerate(domains):
            if len(rows) >= k + 2:
                clock.skip()
                continue
            start = time.perf_counter()
            tag = f"[{spec.key} seed {seed}] {k + 1}/{len(domains)} {d.name}"
            if d.name not in cm.stack.domains:
                cm.add_domain(
                    d.name,
                    d.train,
                    train_cfg,
                    acc,
                    seed,
                    run_dir / "metrics.jsonl",
                    run_info,
                    d.info,
                    progress=tag,
                )
            trained = time.perf_counter()
            rows.append(evaluate_row(k + 1))
            save_rows()
            clock.done(time.perf_counter() - start)
            if acc.is_main_process:
                steps = cm.stack.domain_entry(d.name).get("steps", 0)
                print(
                    f"{tag}: {steps} steps in {trained - start:.0f} s, eval {time.perf_counter() - trained:.0f} s, "
                    f"holdout loss {rows[-1][k]:.3f} | run {clock.progress()}",
                    flush=True,
                )
        if self.config.eval.routing or self.config.eval.qa:
            from crma.qa_eval import protocol_evals

            tag = f"[{spec.key} seed {seed}]"
            protocol_evals(
                cm, domains, run_dir, self.config.eval, rows, cache, self.cache_path, acc, tag
            )


def missing_evals(config: RunConfig, spec: MethodSpec, unit: Path) -> list[str]:
    """The configured after-run evaluations a (method, seed) folder does not hold yet."""
    missing = []
    if config.eval.routing:
        done = json.loads(p.read_text()) if (p := unit / "routing.json").is_file() else {}
        from crma.qa_eval import routers_to_compare

        routers = routers_to_compare(config.eval.routers, METHODS[spec.name].needs_task_id)
        missing += [f"routing.json:{k}" for k in routers if k not in done]
    if config.eval.qa and not (unit / "qa.json").is_file():
        missing.append("qa.json")
    return missing


RESULT_FILES = ("loss_matrix.json", "metrics.jsonl", "routing.json", "qa.json")


def export_results(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy a run's results without its weights into `dest` (replaced whole, atomically).

    Keeps config.yaml, eval_cache.json and, for each finished (method, seed) whose configured
    evaluations are done too, RESULT_FILES:
    a few hundred KiB, small enough to commit, so a long run outlives the machine it ran on.
    `crma run --reuse DEST` copies those units instead of retraining them, and `crma report
    DEST` rebuilds the report. Unfinished units are left out: resuming them needs weights.
    Returns the exported units as "label/seed-N".
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); give `crma run`'s --out")
    config = load_config(run_dir / "config.yaml")
    specs = {spec.key: spec for spec in config.methods}
    units = sorted(
        m.parent
        for m in run_dir.glob("*/seed-*/loss_matrix.json")
        if m.parent.parent.name in specs
        and ProtocolRun._finished(m.parent, len(json.loads(m.read_text())["domains"]))
        and not missing_evals(config, specs[m.parent.parent.name], m.parent)
    )
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name in ("config.yaml", "eval_cache.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        for unit in units:
            target = tmp / unit.relative_to(run_dir)
            target.mkdir(parents=True)
            for name in RESULT_FILES:
                if (unit / name).is_file():
                    shutil.copy2(unit / name, target / name)
    return [str(u.relative_to(run_dir)) for u in units]


class _Clock:
    """Progress and ETA over all (method, seed, domain) stages, counting only stages run now."""

    def __init__(self, total: int):
        self.total, self.finished, self.run_count, self.seconds = total, 0, 0, 0.0

    def skip(self) -> None:
        self.finished += 1

    def done(self, seconds: float) -> None:
        self.finished += 1
        self.run_count += 1
        self.seconds += seconds

    def progress(self) -> str:
        left = self.total - self.finished
        eta = self.seconds / max(1, self.run_count) * left
        return f"{self.finished}/{self.total} stages, ETA {_fmt(eta)}"


def _fmt(seconds: float) -> str:
    minutes = int(seconds // 60)
    return (
        f"{minutes // 60}h{minutes % 60:02d}m"
        if minutes >= 60
        else f"{minutes}m{int(seconds % 60):02d}s"
    )
