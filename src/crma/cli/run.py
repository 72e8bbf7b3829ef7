"""`crma run CONFIG.yaml`: the forgetting protocol; `crma report DIR` to redo its report (with
`--costs`, the head-to-head table), `crma export` and `crma tune GRID.yaml` (trials on the
validation split)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from crma.errors import UserError
from crma.methods import METHODS
from crma.protocol.config import DomainSpec, MethodSpec, RunConfig, load_config
from crma.protocol.run import ProtocolRun
from crma.protocol.store import export_results
from crma.settings import describe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the protocol: methods x seeds x domains, loss matrix, drift report",
        description=(
            "Run every method on every seed over the config's domains (the embedded corpus by default), "
            "evaluate the loss matrix after every stage and write report.json, report.md and plots/ "
            "into the run directory. Rerun the same command to resume."
        ),
        epilog=config_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        type=Path,
        metavar="RUN_DIR",
        help="copy finished (method, seed) results from another run directory where that method's "
        "settings, data and seed are identical, instead of training them again; repeatable",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="LABEL",
        help="run only this condition of the config (its label, or its name when it has none), "
        "with all its settings; repeatable. One process per condition and seed, exported, "
        "then assembled with --reuse: how long comparisons run on several cores",
    )
    p.set_defaults(func=run)

    e = sub.add_parser(
        "export",
        help="copy a run's results without weights (small enough to commit; --reuse takes them)",
        description=(
            "Copy config.yaml, eval_cache.json and every finished (method, seed)'s loss matrix, "
            "metrics and routing/QA results of a run directory into DEST, without the weights. "
            "`crma run CONFIG --reuse DEST` then copies those units instead of retraining them, "
            "and `crma report DEST` rebuilds the report. Unfinished units are not exported."
        ),
    )
    e.add_argument("run_dir", type=Path, help="run directory written by `crma run`")
    e.add_argument("dest", type=Path, help="folder to write (replaced if it exists)")
    e.set_defaults(func=export)

    r = sub.add_parser(
        "report", help="rebuild report.json, report.md and plots/ of a run directory"
    )
    r.add_argument("run_dir", type=Path, help="run directory written by `crma run`")
    r.add_argument(
        "--costs",
        type=Path,
        default=None,
        help="benchmarks/methods.py's JSON: put the head-to-head table (forgetting beside "
        "trainable parameters, memory, step and domain time, task id) first in the report",
    )
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --costs: write report.json, report.md, config.yaml and plots/ there "
        "(default: the run directory)",
    )
    r.add_argument(
        "--before-note",
        default=None,
        metavar="TEXT",
        help="with --costs, when the folder already holds a head-to-head: what that earlier "
        "table was (e.g. 'five-trial budget, corpus v1'); its rows whose numbers change are "
        "kept in the report's history under this name, with the settings that changed",
    )
    r.set_defaults(func=report)

    t = sub.add_parser(
        "tune",
        help="hyperparameter trials on the validation split, one selection rule for every method",
        description=(
            "Run the trials a grid file declares (configs/tuning/*.yaml), each a protocol run on "
            "the validation split, and choose each method's setting by one rule: the lowest "
            "final validation loss among trials that forget at most 0.5 %, else the least "
            "drift. Axes are searched in order, each at the earlier axes' choices; an axis given "
            "again is a second pass. Axes whose choice sits at an edge are extended one step at a "
            "time within their limits. Finished trials are read back, so rerunning resumes, also "
            "from their export without weights in <results>/runs/ (commit it to resume "
            "elsewhere)."
        ),
    )
    t.add_argument(
        "grid", type=Path, help="grid file: config, set, methods + axes, or grid / points"
    )
    t.add_argument(
        "--out",
        type=Path,
        default=Path("runs/tuning"),
        help="trial run directories (default: %(default)s)",
    )
    t.add_argument(
        "--results",
        type=Path,
        default=Path("results/tuning"),
        help="where <grid name>.md and .json go (default: %(default)s)",
    )
    t.set_defaults(func=tune)


def config_keys() -> str:
    """Every config key with its default and meaning, section by section."""
    sections = {
        f.name: f.default_factory
        for f in dataclasses.fields(RunConfig)
        if f.default_factory is not dataclasses.MISSING
        and dataclasses.is_dataclass(f.default_factory)
    }
    parts = [
        "config keys (YAML; override any with --set section.key=value):",
        describe(RunConfig, skip=tuple(sections)),
        "methods[] (a name, or a mapping):",
        describe(MethodSpec),
        "domains[]:",
        describe(DomainSpec),
    ]
    for name, cls in sections.items():
        parts += [f"{name}:", describe(cls)]
    for name, method in METHODS.items():
        if dataclasses.fields(method.Options):
            parts += [f"methods[].options for {name}:", describe(method.Options)]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> None:
    from crma.report.markdown import drift_table

    config = only(load_config(args.config, args.set), args.only, args.config)
    out = args.out or Path("runs") / args.config.stem
    result = ProtocolRun(config, out, reuse=args.reuse).run()
    if result is not None:
        print(f"\nDrift (%), positive = forgetting — {out / 'report.md'}\n")
        print(drift_table(result))


def only(config: RunConfig, labels: list[str], path: Path) -> RunConfig:
    """The config with just the conditions `labels` names (all of them when it names none)."""
    known = [m.key for m in config.methods]
    if unknown := [label for label in labels if label not in known]:
        raise UserError(
            f"--only: {unknown[0]!r} is not a condition of {path}; its conditions: "
            + ", ".join(known)
        )
    if not labels:
        return config
    return dataclasses.replace(config, methods=[m for m in config.methods if m.key in labels])


def report(args: argparse.Namespace) -> None:
    from crma.report.build import build_report
    from crma.report.markdown import drift_table

    if not args.run_dir.is_dir():
        raise UserError(f"{args.run_dir}: run directory not found")
    for flag, value in (("--out", args.out), ("--before-note", args.before_note)):
        if value is not None and args.costs is None:
            raise UserError(f"{flag}: only with --costs (the run's own report stays in the run)")
    if args.costs is not None:
        from crma.report.head_to_head import load_costs, previous, write_head_to_head

        load_costs(args.costs)  # a bad file fails before anything is written
        out = args.out or args.run_dir
        before = previous(out)  # before build_report rewrites a run directory's report.json
    result = build_report(args.run_dir)
    if args.costs is not None:
        write_head_to_head(args.run_dir, result, args.costs, out, before, args.before_note)
    print(drift_table(result))


def export(args: argparse.Namespace) -> None:
    units = export_results(args.run_dir, args.dest)
    print(
        f"{args.dest}: {len(units)} finished method/seed results"
        + "".join(f"\n  {u}" for u in units)
    )


def tune(args: argparse.Namespace) -> None:
    from crma.tune import tune as run_trials

    chosen = run_trials(args.grid, args.out, args.results)
    print("selected: " + json.dumps(chosen), flush=True)
    print(f"{args.results / args.grid.stem}.md")
