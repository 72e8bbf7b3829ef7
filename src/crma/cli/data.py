"""`crma data`: build the embedded corpus, clean a dataset, check holdouts for contamination."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from crma.settings import add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from crma.data.clean import CheckSettings, CleanConfig

    p = sub.add_parser("data", help="build the embedded corpus, clean data, check contamination")
    data = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    build = data.add_parser("build", help="build the five-domain corpus from the data packages")
    build.add_argument("--out", type=Path, help="corpus directory (default: the shared cache)")
    build.add_argument("--force", action="store_true", help="rebuild even if already built")
    build.set_defaults(func=run_build)

    clean = data.add_parser("clean", help="normalise, filter and deduplicate a data file")
    clean.add_argument("input", type=Path, metavar="IN", help=".jsonl or .txt file")
    clean.add_argument("--out", type=Path, required=True, help="cleaned JSONL file to write")
    clean.add_argument("--report", type=Path, help="write what was removed and why as JSON")
    add_arguments(clean, CleanConfig)
    clean.set_defaults(func=run_clean)

    check = data.add_parser(
        "check", help="find holdout rows duplicating training rows (exit 1 above --threshold)"
    )
    check.add_argument("train", type=Path, metavar="TRAIN", help="training file, or a corpus dir")
    check.add_argument("holdout", type=Path, nargs="*", metavar="HOLDOUT", help="holdout files")
    check.add_argument("--report", type=Path, help="write every leak as JSON")
    add_arguments(check, CheckSettings)
    check.set_defaults(func=run_check)

    stats = data.add_parser("stats", help="print the counts and sources of a built corpus")
    stats.add_argument("root", type=Path, nargs="?", metavar="DIR", help="corpus directory")
    stats.set_defaults(func=run_stats)


def run_build(args: argparse.Namespace) -> None:
    from crma.data.corpus import build_corpus, default_root, summary_table

    root = args.out or default_root()
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and not args.force:
        print(f"corpus already built at {root} (use --force to rebuild)")
        print(summary_table(json.loads(manifest_path.read_text("utf-8"))))
        return
    start = time.monotonic()
    manifest = build_corpus(root)
    print(summary_table(manifest))
    print(f"built {root} in {time.monotonic() - start:.0f} s")


def run_stats(args: argparse.Namespace) -> None:
    from crma.data.corpus import default_root, summary_table
    from crma.errors import UserError

    root = args.root or default_root()
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{root}: no manifest.json; build it with `crma data build --out {root}`")
    print(summary_table(json.loads(manifest_path.read_text("utf-8"))))


def run_clean(args: argparse.Namespace) -> None:
    from crma.data.clean import CleanConfig, clean_records
    from crma.data.formats import load_records, write_records
    from crma.fileio import write_json

    records = load_records(args.input)
    kept, report = clean_records(records, from_args(CleanConfig, args), where=lambda i: i + 1)
    write_records(args.out, kept)
    report = {"input": str(args.input), "output": str(args.out), **report}
    if args.report:
        write_json(args.report, report)
    removed = ", ".join(f"{k} {v}" for k, v in report["removed"].items()) or "nothing"
    print(f"{args.input}: kept {len(kept)} of {len(records)} rows; removed: {removed}")
    print(f"wrote {args.out}" + (f" and {args.report}" if args.report else ""))


def run_check(args: argparse.Namespace) -> int:
    from crma.data.clean import CheckSettings, CleanConfig, find_contamination
    from crma.fileio import write_json

    settings = from_args(CheckSettings, args)
    train, holdout = _check_inputs(args)
    cfg = CleanConfig(
        near_dup_threshold=settings.near_dup_threshold,
        containment_threshold=settings.containment_threshold,
        containment_ngram=settings.ngram,
    )
    leaks = find_contamination([r[:2] for r in train], [r[:2] for r in holdout], cfg)
    for leak in leaks:
        leak["holdout_row"] = holdout[leak["holdout_row"]][2]
        leak["train_row"] = train[leak["train_row"]][2]
    share = len(leaks) / len(holdout)
    print(_check_summary(leaks, len(holdout), share))
    for leak in leaks[:10]:
        print(
            f"  {leak['holdout_row']} ~ {leak['train_row']}: {leak['kind']}, "
            f"Jaccard {leak['similarity']:.2f}, contained {leak['containment']:.2f} in one "
            f"row and {leak['containment_all']:.2f} in all, {leak['scope'].replace('_', ' ')}"
        )
    if args.report:
        write_json(args.report, {"holdout_rows": len(holdout), "share": share, "leaks": leaks})
    if share > settings.threshold:
        print(
            f"contamination {share:.2%} is above --threshold {settings.threshold:.2%}",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_inputs(args: argparse.Namespace):
    """(domain, text, 'file:record') rows of the training and holdout side."""
    from crma.data.corpus import DOMAINS
    from crma.errors import UserError

    if args.train.is_dir():
        train_files = [args.train / d / "train.jsonl" for d in DOMAINS]
        holdout_files = args.holdout or [args.train / d / "holdout.jsonl" for d in DOMAINS]
    elif args.holdout:
        train_files, holdout_files = [args.train], args.holdout
    else:
        raise UserError(f"{args.train}: give at least one HOLDOUT file after the training file")
    return _rows(train_files), _rows(holdout_files)


def _rows(paths: list[Path]) -> list[tuple[str, str, str]]:
    from crma.data.formats import load_records, record_text

    rows = []
    for path in paths:
        for n, record in enumerate(load_records(path), 1):
            domain = record.get("domain") or path.name.split(".")[0]
            rows.append((domain, record_text(record), f"{path}:{n}"))
    return rows


def _check_summary(leaks: list[dict], total: int, share: float) -> str:
    def count(key: str, value: str) -> int:
        return sum(leak[key] == value for leak in leaks)

    return (
        f"{total} holdout rows, {len(leaks)} contaminated ({share:.2%}): "
        f"{count('kind', 'exact')} exact, {count('kind', 'near')} near, "
        f"{count('kind', 'contained')} contained; "
        f"{count('scope', 'within_domain')} within a domain, "
        f"{count('scope', 'cross_domain')} across domains"
    )
