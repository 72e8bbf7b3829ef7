"""`crma eval STACK`: QA accuracy per domain for base, oracle, routed and backbone-off weights;
`crma eval --base-only`: the base model alone on the embedded corpus's items."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crma.errors import UserError
from crma.routing.router import RouteSettings
from crma.settings import add_arguments, from_args

if TYPE_CHECKING:
    from crma.eval.qa import QASettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="QA accuracy of a stack: base, oracle domain, routed, backbone off",
        description="Score multiple-choice items of every domain by log-likelihood, with Wilson "
        "95% intervals, under the base model, the stack with the oracle domain, the stack "
        "routed, and the stack with its CRMA backbone switched off. Domains of the embedded "
        "corpus use its continuation probes and MMLU subsets; give others with --probes. "
        "With --base-only, the base model alone (no stack needed) on the embedded corpus's "
        "five domains: what every trained model is read against.",
    )
    p.add_argument("stack", type=Path, nargs="?", help="stack directory")
    p.add_argument(
        "--base-only",
        action="store_true",
        help="score the base model alone (--base, default: the stack's or the embedded model)",
    )
    p.add_argument(
        "--probes",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="JSONL items for domain NAME ({prompt, options, answer} or {question, choices, "
        "answer}); repeatable; replaces the corpus items of that domain",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: STACK/eval, or runs/eval-base with --base-only)",
    )
    p.add_argument("--base", default=None, help="base model (default: the one in the manifest)")
    from crma.eval.qa import QASettings

    add_arguments(p, QASettings)
    add_arguments(p, RouteSettings)
    p.set_defaults(func=run)


def parse_probes(items: list[str], domains: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            raise UserError(f"--probes {item!r}: expected NAME=FILE, e.g. --probes legal=q.jsonl")
        if name not in domains:
            raise UserError(
                f"--probes {item!r}: the stack has no domain {name!r}; it has: {', '.join(domains)}"
            )
        out[name] = Path(file)
    return out


def run(args: argparse.Namespace) -> None:
    from crma.eval.qa import (
        QASettings,
        corpus_items,
        evaluate_qa,
        markdown_table,
        read_items,
        write_eval,
    )
    from crma.generate import load_stack

    settings = from_args(QASettings, args)
    if args.base_only:
        return base_only(args, settings)
    if args.stack is None:
        raise UserError("give a STACK to evaluate, or --base-only to score the base model alone")
    model = load_stack(args.stack, args.base)
    domains = model.domains
    files = parse_probes(args.probes, domains)
    items = corpus_items([d for d in domains if d not in files], settings)
    for name, path in files.items():
        items[name] = {"probes": read_items(path)}
    skipped = [d for d in domains if d not in items]
    if skipped:
        print(f"no QA items for {', '.join(skipped)} (give them with --probes)", file=sys.stderr)
    if not items:
        raise UserError(
            f"{args.stack}: no QA items for any domain; give them with --probes NAME=FILE"
        )
    items = {d: items[d] for d in domains if d in items}
    done: list[str] = []

    def progress(domain: str) -> None:
        done.append(domain)
        print(f"QA: {domain} scored ({len(done)}/{len(items)})", file=sys.stderr, flush=True)

    result = evaluate_qa(model.cm, items, from_args(RouteSettings, args), settings, None, progress)
    json_path, _ = write_eval(result, args.out or args.stack / "eval")
    print(markdown_table(result))
    print(f"\n{json_path}")


def base_only(args: argparse.Namespace, settings: QASettings) -> None:
    """The base model without adapter or backbone on every embedded-corpus domain."""
    from crma.data.corpus import DOMAINS
    from crma.engine import Engine, LoraSettings
    from crma.eval.qa import corpus_items, evaluate_base, markdown_table, write_eval
    from crma.model import load_base
    from crma.stack import Stack

    if args.probes:
        raise UserError("--probes: only with a stack (--base-only scores the corpus's items)")
    name = args.base or (
        Stack.open(args.stack).manifest["base_model"]["name"] if args.stack else "embedded"
    )
    out = args.out or (args.stack / "eval" if args.stack else Path("runs") / "eval-base")
    model, tokenizer = load_base(name)
    engine = Engine(model, tokenizer, LoraSettings(), backbone=None)

    def progress(domain: str) -> None:
        print(f"QA: {domain} scored (base)", file=sys.stderr, flush=True)

    result = evaluate_base(engine, corpus_items(list(DOMAINS), settings), settings, progress)
    json_path, _ = write_eval(result, out)
    print(markdown_table(result))
    print(f"\n{json_path}")
