"""`crma train STACK --domain NAME=FILE ...`: add domains to a stack, one after another."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from crma.backbone import CRMAConfig
from crma.continual import ContinualModel, StackSpec
from crma.distributed import make_accelerator
from crma.engine import LoraSettings
from crma.errors import UserError
from crma.methods import METHODS, make_method
from crma.model import EMBEDDED, base_model_id, file_sha256, load_base
from crma.quantize import quantization_config
from crma.settings import add_arguments, from_args
from crma.stack import METRICS, check_domain_name
from crma.train import MEMORY_ONLY, TrainConfig, mixed_precision, result_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="add domains to a stack (creates it on first use)",
        description=(
            "Add one or more domains to STACK, in the order given. The first call creates the stack; "
            "later calls continue it. Settings of the adapters (method, LoRA, CRMA) are fixed when the "
            "stack is created; training settings apply to the domains of this call. Kill it at any "
            "time: rerunning the same command resumes from the last checkpoint."
        ),
    )
    p.add_argument("stack", type=Path, help="stack directory")
    p.add_argument(
        "--base",
        default=EMBEDDED,
        help="base model: 'embedded', a HF folder or hub name, or a .gguf file",
    )
    p.add_argument(
        "--domain",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="domain name and training file (JSONL text/prompt-completion/messages/alpaca, or .txt); repeatable",
    )
    p.add_argument(
        "--route-examples",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="prompts in the style users send to domain NAME (same formats as --domain), stored "
        "in the router beside NAME's training texts and never trained on: when users ask "
        "questions and the training data are passages, routing needs examples of both; repeatable",
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="method for a new stack (default: crma)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option for a new stack, e.g. --method ewc --option ewc_lambda=10 "
        "(`crma run --help` lists each method's options); repeatable",
    )
    p.add_argument(
        "--replace", action="store_true", help="retrain a domain that the stack already has"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for adapter init, data order and dropout"
    )
    quantized = p.add_mutually_exclusive_group()
    for bits in ("4bit", "8bit"):
        quantized.add_argument(
            f"--load-in-{bits}",
            dest="load_in",
            action="store_const",
            const=bits,
            default="float",
            help=f"load a Hugging Face base with {bits} weights (bitsandbytes; CUDA GPUs only)",
        )
    add_arguments(p, TrainConfig)
    add_arguments(p, LoraSettings, prefix="lora_")
    add_arguments(p, CRMAConfig, prefix="crma_")
    p.set_defaults(func=run)


def parse_domains(items: list[str], flag: str = "--domain") -> list[tuple[str, Path]]:
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected NAME=FILE, e.g. {flag} medical=med.jsonl")
        name, file = item.split("=", 1)
        path = Path(file)
        if not path.is_file():
            raise UserError(f"{flag} {item!r}: {path} not found")
        out.append((check_domain_name(name), path))
    check_distinct([n for n, _ in out], flag)
    return out


def parse_route_examples(items: list[str], domains: list[str]) -> dict[str, Path]:
    """--route-examples NAME=FILE, each NAME one of this call's --domain names."""
    out = dict(parse_domains(items, "--route-examples"))
    for name in out:
        if name not in domains:
            raise UserError(
                f"--route-examples {name}=…: no --domain {name} in this command; "
                "route examples are stored when their domain is trained"
            )
    return out


def check_distinct(names: list[str], where: str) -> None:
    """Names must differ beyond case: adapters/<name>/ folders clash on case-blind disks."""
    folded = [n.lower() for n in names]
    for i, name in enumerate(folded):
        if name in folded[:i]:
            raise UserError(
                f"{where}: {names[i]!r} and {names[folded.index(name)]!r} differ only in case"
            )


def parse_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option ewc_lambda=10")
        options[key] = yaml.safe_load(raw)
    return options


def run(args: argparse.Namespace) -> None:
    from crma.data import load_records

    domains = parse_domains(args.domain)
    route_files = parse_route_examples(args.route_examples, [n for n, _ in domains])
    options = parse_options(args.option)
    # Refused now, before any work, if this machine cannot load the base that way.
    quantization_config(args.load_in, args.base, f"--load-in-{args.load_in}")
    method = args.method or "crma"
    make_method(method, options, f"--method {method}")  # a typo fails before any work
    spec = StackSpec(
        method=method,
        method_options=options,
        lora=from_args(LoraSettings, args, prefix="lora_"),
        crma=from_args(CRMAConfig, args, prefix="crma_"),
    )
    train_cfg = from_args(TrainConfig, args)
    # every file read before training
    records = {name: load_records(path) for name, path in domains}
    route_records = {name: load_records(path) for name, path in route_files.items()}
    cm = ContinualModel.open_or_create(
        args.stack,
        lambda: load_base(args.base, load_in=args.load_in),
        base_model_id(args.base),
        spec,
    )
    if spec.method_options and spec.method_options != cm.spec.method_options:
        raise UserError(
            f"{args.stack}: method options are fixed when a stack is created "
            f"(this one has {cm.spec.method_options or 'none'}); drop --option or use a new stack"
        )
    infos = {name: _data_info(path, route_files.get(name)) for name, path in domains}
    done = {n for n, _ in domains if _done(cm, n, infos[n], train_cfg, args.seed)}
    todo = [n for n, _ in domains if n not in done]
    for name in todo:
        if name in cm.stack.domains and not args.replace:
            raise UserError(
                f"{args.stack}: domain {name!r} already exists (trained on other data or "
                "settings); pass --replace to retrain it"
            )
    check_distinct(cm.stack.domains + [n for n in todo if n not in cm.stack.domains], "--domain")
    acc = make_accelerator(mixed_precision(train_cfg.precision))
    cm.tidy(acc)
    if done and acc.is_main_process:
        print(f"{', '.join(sorted(done))}: already trained on this data with these settings")
    for i, name in enumerate(todo):
        result = train_domain(
            cm,
            name,
            dict(domains)[name],
            records[name],
            train_cfg,
            acc,
            args.seed,
            replace=args.replace,
            progress=f"{name} ({i + 1}/{len(todo)})",
            route_records=route_records.get(name, []),
            info=infos[name],
        )
        if acc.is_main_process:
            print(
                f"{name}: {result['steps']} steps, final train loss {result['final_train_loss']:.4f}"
            )
    if acc.is_main_process:
        print(
            f"{args.stack}: {len(cm.stack.domains)} domains ({', '.join(cm.stack.domains)}), method {cm.spec.method}"
        )


def _data_info(path: Path, route_path: Path | None = None) -> dict[str, Any]:
    info = {"train_file": str(path), "train_sha256": file_sha256(path)}
    if route_path is not None:
        info |= {"route_file": str(route_path), "route_sha256": file_sha256(route_path)}
    return info


def _done(cm: ContinualModel, name: str, info: dict[str, Any], cfg: TrainConfig, seed: int) -> bool:
    """Whether the stack already holds `name` from this very data and settings: the same
    command run again after a kill continues with the next domain instead of refusing."""
    if name not in cm.stack.domains:
        return False
    entry = cm.stack.domain_entry(name)
    recorded = {k: v for k, v in entry.get("train_config", {}).items() if k not in MEMORY_ONLY}
    return (
        entry.get("train_sha256"),
        entry.get("route_sha256"),
        recorded,
        entry.get("seed"),
    ) == (info["train_sha256"], info.get("route_sha256"), result_settings(cfg), seed)


def train_domain(
    cm: ContinualModel,
    name: str,
    path: Path,
    records: list[dict[str, Any]],
    train_cfg: TrainConfig,
    accelerator,
    seed: int,
    replace: bool = False,
    progress: str = "",
    info: dict[str, Any] | None = None,
    route_records: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Train domain `name` on the records of file `path` and commit it to the stack, with
    `route_records` stored in its router entry (see `--route-examples`).

    What `crma train` does per domain; `crma serve`'s fine-tuning jobs call it too.
    """
    from crma.data import tokenize_records

    tokenizer, length = cm.engine.tokenizer, train_cfg.max_length
    examples = tokenize_records(records, tokenizer, length)
    info = {**_data_info(path), "train_examples": len(examples), **(info or {})}
    return cm.add_domain(
        name,
        examples,
        train_cfg,
        accelerator,
        seed,
        cm.stack.path / METRICS,
        {"method": cm.spec.method, "seed": seed},
        info,
        replace=replace,
        progress=progress,
        route_examples=tokenize_records(route_records, tokenizer, length) if route_records else [],
    )
