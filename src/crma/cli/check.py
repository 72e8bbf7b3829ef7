"""`crma check STACK`: verify every file of a stack (hashes, router, backbone, adapters)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="verify a stack: file hashes, router, backbone shape, adapter configs",
        description=(
            "Check that every file the manifest lists is there with its size and sha256, that "
            "the router covers every domain, that the backbone fits the base model and that "
            "every adapter fits the stack's LoRA settings, without loading the model's weights. "
            "Prints what was checked; the first problem is a one-line error (exit code 2)."
        ),
    )
    p.add_argument("stack", type=Path, help="stack directory")
    p.add_argument(
        "--base",
        default=None,
        help="base model to check the backbone against (default: the manifest's)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crma.integrity import check_stack

    lines = check_stack(args.stack, args.base)
    print("\n".join(lines))
    print(f"{args.stack}: ok")
