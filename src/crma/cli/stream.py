"""`crma stream STACK --input STREAM`: grow a stack from an unlabelled stream of documents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crma.errors import UserError
from crma.settings import add_arguments, from_args
from crma.stream.detector import DetectorSettings
from crma.stream.learner import StreamSettings
from crma.train import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    from crma.methods import METHODS
    from crma.model import EMBEDDED

    p = sub.add_parser(
        "stream",
        help="learn online from an unlabelled stream: detect new domains, train their adapters",
        description=(
            "Read documents in order; detect where a new domain starts (as `crma segment` does); "
            "train a fresh adapter once a new domain has --min-segment documents and add it to "
            "the router; route documents of known domains to their adapters. Decisions, "
            "segments and timings go to STACK/stream.jsonl. Killed at any point, the same "
            "command resumes with the same decisions."
        ),
    )
    p.add_argument("stack", type=Path, help="stack directory (created if missing)")
    p.add_argument("--input", type=Path, required=True, help="documents in order: .jsonl or .txt")
    p.add_argument(
        "--names",
        default="",
        help="comma-separated names for the new domains, in the order they are found "
        "(default: new-1, new-2, ...)",
    )
    p.add_argument("--base", default=EMBEDDED, help="base model of a new stack")
    p.add_argument("--method", choices=list(METHODS), default="crma", help="method of a new stack")
    p.add_argument("--seed", type=int, default=0, help="seed for adapter init and data order")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="at the end, retrain each domain known at the start that recurred with "
        "--min-segment documents, on those documents (replaces its adapter; off by default, "
        "so earlier adapters stay untouched)",
    )
    add_arguments(p, StreamSettings)
    add_arguments(p, DetectorSettings)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def parse_names(text: str, existing: list[str]) -> list[str]:
    from crma.cli.train import check_distinct
    from crma.stack import check_domain_name

    names = [n.strip() for n in text.split(",")] if text.strip() else []
    for name in names:
        check_domain_name(name)
        if name.lower() in {d.lower() for d in existing}:
            raise UserError(f"--names: the stack already has a domain {name!r}")
    check_distinct(names, "--names")
    return names


def run(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from crma.backbone import CRMAConfig
    from crma.continual import ContinualModel, StackSpec
    from crma.data.formats import load_records
    from crma.engine import LoraSettings
    from crma.model import base_model_id, load_base
    from crma.stack import Stack
    from crma.stream.learner import StreamLearner
    from crma.train import mixed_precision

    if str(args.input) == "-":
        raise UserError("--input -: crma stream rereads its input to resume; give a file")
    settings = from_args(StreamSettings, args)
    detector = from_args(DetectorSettings, args)
    train_cfg = from_args(TrainConfig, args)
    existing = Stack.open(args.stack).domains if Stack.exists(args.stack) else []
    names = parse_names(args.names, existing)
    records = load_records(args.input)  # a bad file fails before the model loads
    spec = StackSpec(args.method, {}, LoraSettings(), CRMAConfig())
    cm = ContinualModel.open_or_create(
        args.stack, lambda: load_base(args.base), base_model_id(args.base), spec
    )
    acc = Accelerator(mixed_precision=mixed_precision(train_cfg.precision))
    learner = StreamLearner(
        cm, args.input, settings, detector, train_cfg, acc, args.seed, names, args.refresh
    )
    cm.tidy(acc)
    done = learner.run(records)
    segments = ", ".join(f"{s['domain']}@{s['start']}" for s in done["segments"])
    print(f"{args.input}: {done['documents']} documents; segments {segments}", file=sys.stderr)
    print(
        f"{args.stack}: trained {', '.join(done['trained']) or 'no new domain'}; "
        f"log in {args.stack / 'stream.jsonl'}"
    )
