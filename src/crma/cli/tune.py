"""`crma tune GRID.yaml`: hyperparameter trials on the validation split and the one selection rule."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter trials on the validation split, one selection rule for every method",
        description=(
            "Run the trials a grid file declares (configs/tuning/*.yaml), each a protocol run on "
            "the validation split, and choose each method's setting by one rule: the lowest "
            "final validation loss among trials that forget at most 0.5 %%, else the least "
            "drift. Axes whose choice sits at an edge are extended one step at a time within "
            "their limits. Finished trials are read back, so rerunning resumes."
        ),
    )
    p.add_argument(
        "grid", type=Path, help="grid file: config, set, methods + axes, or grid / points"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/tuning"),
        help="trial run directories (default: %(default)s)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path("results/tuning"),
        help="where <grid name>.md and .json go (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crma.tune import tune

    chosen = tune(args.grid, args.out, args.results)
    print("selected: " + json.dumps(chosen), flush=True)
    print(f"{args.results / args.grid.stem}.md")
