"""A run directory's results: which units are finished, reusing finished units of other runs
with identical settings, and exporting results without weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.eval.hook import STORED_ROUTERS, routers_to_compare, stale
from crma.fileio import atomic_path
from crma.methods import METHODS
from crma.protocol.config import MethodSpec, RunConfig, load_config, unit_settings
from crma.provenance import recorded_data

RESULT_FILES = ("loss_matrix.json", "metrics.jsonl", "routing.json", "qa.json")


def finished(unit: Path, n_domains: int) -> bool:
    """A (method, seed) folder whose loss matrix has every row: the base and each domain."""
    matrix = unit / "loss_matrix.json"
    return matrix.is_file() and len(json.loads(matrix.read_text())["loss_matrix"]) == n_domains + 1


def reusable_unit(
    config: RunConfig,
    spec: MethodSpec,
    seed: int,
    n_domains: int,
    data: dict[str, Any],
    reuse: list[Path],
) -> tuple[Path, Path] | None:
    """A finished unit of one of the `reuse` runs whose settings for (spec, seed) are identical
    and whose data is this run's: (its folder, its run directory), or None.

    Same settings, seed and machine give the same numbers (the resume test checks this),
    so rerunning it would only cost time. A label only names a condition: a unit stored
    there under another label with identical settings is found too (same label first).
    """
    wanted = unit_settings(config, spec)
    for other in reuse:
        if not (other / "config.yaml").is_file():
            continue
        try:
            theirs = load_config(other / "config.yaml")
        except UserError as exc:  # written by another crma version: train rather than fail
            print(f"[{spec.key} seed {seed}] not reused from {other}: {exc}", flush=True)
            continue
        if seed not in theirs.seeds:
            continue
        twins = [m.key for m in theirs.methods if unit_settings(theirs, m) == wanted]
        for key in sorted(twins, key=lambda k: k != spec.key):
            source = other / key / f"seed-{seed}"
            if not finished(source, n_domains):
                continue
            if (recorded := recorded_data(source, not theirs.domains)) not in (data, None):
                print(
                    f"[{spec.key} seed {seed}] not reused from {source}: other data "
                    f"({json.dumps(recorded)})",
                    flush=True,
                )
                continue
            return source, other
    return None


def missing_evals(config: RunConfig, spec: MethodSpec, unit: Path) -> list[str]:
    """The configured after-run evaluations a (method, seed) folder does not hold yet."""
    missing, stored = [], config.eval.route_questions
    needs_task_id = METHODS[spec.name].needs_task_id
    if config.eval.routing:
        done = json.loads(p.read_text()) if (p := unit / "routing.json").is_file() else {}
        if stale(unit / "routing.json", stored):
            done = {k: v for k, v in done.items() if k not in STORED_ROUTERS}
        routers = routers_to_compare(config.eval.routers, needs_task_id)
        missing += [f"routing.json:{k}" for k in routers if k not in done]
    if config.eval.qa:
        qa = unit / "qa.json"
        if not qa.is_file() or (needs_task_id and stale(qa, stored)):
            missing.append("qa.json")
    return missing


def export_results(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy a run's results without its weights into `dest` (replaced whole, atomically).

    Keeps config.yaml, eval_cache.json and, for each finished (method, seed) whose configured
    evaluations are done too, RESULT_FILES:
    a few hundred KiB, small enough to commit, so a long run outlives the machine it ran on.
    `crma run --reuse DEST` copies those units instead of retraining them, and `crma report
    DEST` rebuilds the report. Unfinished units are left out: resuming them needs weights.
    Returns the exported units as "label/seed-N".
    """
    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); give `crma run`'s --out")
    config = load_config(run_dir / "config.yaml")
    specs = {spec.key: spec for spec in config.methods}
    units = sorted(
        m.parent
        for m in run_dir.glob("*/seed-*/loss_matrix.json")
        if m.parent.parent.name in specs
        and finished(m.parent, len(json.loads(m.read_text())["domains"]))
        and not missing_evals(config, specs[m.parent.parent.name], m.parent)
    )
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name in ("config.yaml", "eval_cache.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        for unit in units:
            target = tmp / unit.relative_to(run_dir)
            target.mkdir(parents=True)
            for name in RESULT_FILES:
                if (unit / name).is_file():
                    shutil.copy2(unit / name, target / name)
    return [str(u.relative_to(run_dir)) for u in units]
