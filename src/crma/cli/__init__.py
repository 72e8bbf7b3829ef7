"""The `crma` command line. Each sub-command lives in its own module with a `register`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import NoReturn

from crma.errors import UserError

# Sub-command modules, in the order `crma --help` lists them.
COMMANDS = [
    "crma.cli.demo",
    "crma.cli.train",
    "crma.cli.segment",
    "crma.cli.stream",
    "crma.cli.generate",
    "crma.cli.serve",
    "crma.cli.eval",
    "crma.cli.run",
    "crma.cli.check",
    "crma.cli.data",
]


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error shape: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"crma: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crma",
        description="Continual learning for language models: stack domains without forgetting.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT still calls this transformers API; the deprecation is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"crma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crma: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
