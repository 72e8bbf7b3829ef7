"""`crma segment STREAM`: find where domains start in an unlabelled stream (no training)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crma.settings import add_arguments, from_args
from crma.stream.detector import DetectorSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="detect domain boundaries in an unlabelled stream of documents (no training)",
        description=(
            "Read documents in order (any format `crma train` reads; '-' for JSONL on stdin) and "
            "decide online where a new domain starts and whether it is a known one (a domain of "
            "--stack, or one seen earlier in the stream) or new (new-1, new-2, ...). Writes the "
            "segments [{start, end, domain}] and every document's decision and scores as JSON."
        ),
    )
    p.add_argument("stream", metavar="STREAM", help="documents in order: .jsonl, .txt or '-'")
    p.add_argument("--stack", type=Path, help="stack whose domains are known (default: none)")
    p.add_argument(
        "--base", default=None, help="base model (default: the stack's, else 'embedded')"
    )
    p.add_argument("--out", type=Path, help="JSON file to write (default: stdout)")
    add_arguments(p, DetectorSettings)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crma.data.formats import load_records
    from crma.fileio import write_json
    from crma.stream.segment import segment_records

    settings = from_args(DetectorSettings, args)
    records = load_records(args.stream)  # a bad file fails before the model loads
    engine, known, embedding = open_detection(args.stack, args.base)
    result = {"input": args.stream, "settings": vars(settings)} | segment_records(
        engine, records, settings, known, embedding
    )
    if args.out is None:
        json.dump(result, sys.stdout)
        print()
        return
    write_json(args.out, result)
    print(
        f"{args.stream}: {result['documents']} documents, {len(result['segments'])} segments "
        f"({', '.join(s['domain'] for s in result['segments'])}); wrote {args.out}",
        file=sys.stderr,
    )


def open_detection(stack_path: Path | None, base: str | None):
    """(engine, known domains, embedding settings): the base model alone, and what the stack's
    router knows."""
    from crma.engine import Engine, LoraSettings
    from crma.model import EMBEDDED, base_model_id, load_base
    from crma.routing.index import CentroidSettings
    from crma.stack import Stack
    from crma.stream.segment import known_domains

    known, embedding = {}, CentroidSettings()
    if stack_path is not None:
        stack = Stack.open(stack_path)
        base = base or stack.manifest["base_model"]["name"]
        stack.check_base(base_model_id(base))
        known, embedding = known_domains(stack)
    model, tokenizer = load_base(base or EMBEDDED)
    return Engine(model, tokenizer, LoraSettings(), None), known, embedding
