"""`crma run CONFIG.yaml`: the forgetting protocol, and `crma report DIR` to redo its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from crma.errors import UserError
from crma.protocol import ProtocolRun, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the protocol: methods x seeds x domains, loss matrix, drift report",
        description=(
            "Run every method on every seed over the config's domains (the embedded corpus by default), "
            "evaluate the loss matrix after every stage and write report.json, report.md and plots/ "
            "into the run directory. Rerun the same command to resume."
        ),
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/<config name>)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=10 --set seeds=[0,42]",
    )
    p.set_defaults(func=run)

    r = sub.add_parser(
        "report", help="rebuild report.json, report.md and plots/ of a run directory"
    )
    r.add_argument("run_dir", type=Path, help="run directory written by `crma run`")
    r.set_defaults(func=report)


def run(args: argparse.Namespace) -> None:
    from crma.report import drift_table

    config = load_config(args.config, args.set)
    out = args.out or Path("runs") / args.config.stem
    result = ProtocolRun(config, out).run()
    if result is not None:
        print(f"\nDrift (%), positive = forgetting — {out / 'report.md'}\n")
        print(drift_table(result))


def report(args: argparse.Namespace) -> None:
    from crma.report import build_report, drift_table

    if not args.run_dir.is_dir():
        raise UserError(f"{args.run_dir}: run directory not found")
    print(drift_table(build_report(args.run_dir)))
