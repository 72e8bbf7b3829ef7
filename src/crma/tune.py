"""`crma tune GRID.yaml`: hyperparameter trials on the validation split (carved from `spare`),
never on the holdout, and the one rule that picks every method's setting (`select`).

A grid file names a base run config, fixed overrides, and either

- `methods:` and `axes:` (one budget for everyone): each method is tuned on its own along the
  axes in order, each axis at the values chosen on the axes before it. Whenever a method's
  chosen value sits at an edge of the values tried, the next point one step beyond that edge
  (at most the axis's limit) is tried too (see `next_beyond`), until the choice is interior
  or at the limit. The earlier axis's chosen trial sits on the next axis at the entry's own
  value, and competes in that axis's choice when the axis's values skip it. An axis may come
  again later in the list: a second pass over it at the later axes' choices (a setting
  already tried is not run twice). The final choice is then confirmed on a second seed (see
  `confirm`); or
- `grid: {key: [values]}` (every combination) or `points: [...]` (as listed): fixed trials,
  chosen by the rule on their one seed (no confirmation: they are no method's budget).

Every trial is one protocol run with `corpus.split=validation` (it cannot see the holdout),
and each method's setting is chosen by one rule (see `select`). Trials, scores and choices go
to <results>/<grid name>.md and .json; a finished trial is read back, not rerun, also from
its export under <results>/runs/ (so a grid resumes on another machine from committed files).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.fileio import write_json, write_text
from crma.protocol.config import load_config, read_yaml
from crma.protocol.run import ProtocolRun
from crma.protocol.store import export_results

Scores = dict[str, float]  # drift, plasticity_loss, final_loss


def trial_name(point: dict) -> str:
    """`trial:` if the point names itself (e.g. when it sets a whole method), else key=value,...
    over its settings (a `methods:` list, choosing who runs, is not part of the name)."""
    if "trial" in point:
        return point["trial"]
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items() if k != "methods")


def score(report: dict) -> dict[str, Scores]:
    """Per method: drift, and the mean validation loss right after training each domain."""
    out = {}
    for label, m in report["methods"].items():
        runs = list(m["per_seed"].values())
        out[label] = {
            "drift": m["drift_mean"],
            "plasticity_loss": statistics.fmean(
                statistics.fmean(r["plasticity_loss"]) for r in runs
            ),
            "final_loss": statistics.fmean(statistics.fmean(r["loss_matrix"][-1]) for r in runs),
        }
    return out


EXPORTED = "runs"  # <results>/runs/<grid name>/...: finished trials without weights

MAX_DRIFT = 0.5  # forgetting bound of the selection rule, in % (the paper's target size)
CONFIRM_SEED = 42  # the second seed a method's final choice is rerun on
# How much worse the confirming run's final loss may be, relative: above the largest
# seed-to-seed spread of a condition's mean final loss in the three-seed paper run (0.61 %,
# results/paper), far below a run that diverged (crma-tied's lr 1e-2 rerun: +7 %).
CONFIRM_TOLERANCE = 0.01


def select(trials: list[dict]) -> dict[str, str]:
    """One rule for every method, ours included: the lowest final validation loss among the
    trials that forget at most MAX_DRIFT (drift <= 0.5 %; negative drift, earlier domains
    getting better, is not forgetting); if none forgets that little, the least drift."""
    chosen = {}
    labels = dict.fromkeys(label for t in trials for label in t["scores"])
    for label in labels:  # a trial may run only some of the methods
        runs = [
            (trial_name(t["point"]), t["scores"][label]) for t in trials if label in t["scores"]
        ]
        stable = [r for r in runs if r[1]["drift"] <= MAX_DRIFT]
        best = (
            min(stable, key=lambda r: r[1]["final_loss"])
            if stable
            else min(runs, key=lambda r: r[1]["drift"])
        )
        chosen[label] = best[0]
    return chosen


# -- axes: one method at a time, edges extended -------------------------------------------------
# Each scale maps a value to the coordinate in which the axis's points are evenly spaced.
SCALES: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "log": (math.log, math.exp),  # learning rates, penalty weights
    "linear": (lambda v: v, lambda t: t),
    "log-complement": (lambda v: math.log(1 - v), lambda t: 1 - math.exp(t)),  # shares near 1
}


@dataclass
class Axis:
    """One setting of a method, tried at `values`, extended within `limits` (inclusive).

    `key` is a setting inside the method's entry (`train.lr`, `options.ewc_lambda`); or
    `scale_keys` maps several settings to base values that the axis multiplies together.
    """

    name: str
    values: list[float]
    limits: tuple[float, float]
    scale: str = "log"
    key: str | None = None
    scale_keys: dict[str, float] | None = None

    @classmethod
    def parse(cls, spec: dict, where: str) -> Axis:
        known = ("name", "key", "scale_keys", "values", "limits", "scale")
        if unknown := sorted(set(spec) - set(known)):
            raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        if ("key" in spec) == ("scale_keys" in spec) or "limits" not in spec:
            raise UserError(f"{where}: give limits and exactly one of key, scale_keys")
        lo, hi = spec["limits"]
        axis = cls(
            name=spec.get("name") or spec.get("key", "").split(".")[-1],
            values=[float(v) for v in spec.get("values", [])],
            limits=(float(lo), float(hi)),
            scale=spec.get("scale", "log"),
            key=spec.get("key"),
            scale_keys=spec.get("scale_keys"),
        )
        if not axis.name or axis.scale not in SCALES or len(set(axis.values)) < 2:
            scales = ", ".join(SCALES)
            raise UserError(f"{where}: needs a name, two values or more and a scale: {scales}")
        try:
            for v in axis.values:
                SCALES[axis.scale][0](v)
        except ValueError:
            raise UserError(f"{where}: {axis.values} not all on a {axis.scale} scale") from None
        if not all(lo <= v <= hi for v in axis.values):
            raise UserError(f"{where}: values {axis.values} outside limits {axis.limits}")
        return axis

    def value_in(self, entry: dict) -> float | None:
        """The value a method entry itself sets on this axis (None if it sets none)."""
        if not self.key:
            return None
        node: Any = entry
        for section in self.key.split("."):
            if not isinstance(node, dict) or section not in node:
                return None
            node = node[section]
        return float(node) if isinstance(node, int | float) else None

    def apply(self, entry: dict, value: float) -> None:
        """Set this axis's setting(s) to `value` in a method entry, in place."""
        settings = (
            {self.key: value}
            if self.key
            else {k: base * value for k, base in (self.scale_keys or {}).items()}
        )
        for key, v in settings.items():
            *sections, leaf = key.split(".")
            node = entry
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = v


def next_beyond(axis: Axis, tried: list[float], chosen: float) -> float | None:
    """The next point past the edge where `chosen` sits, one step (the step between the two
    outermost points at that edge, in the axis's scale) further, or the axis's limit on that
    side where the step would pass it; None if `chosen` is interior or at the limit."""
    ordered = sorted(set(tried))
    lo, hi = axis.limits
    if chosen == ordered[0]:
        edge, inner, limit = ordered[0], ordered[1], lo
    elif chosen == ordered[-1]:
        edge, inner, limit = ordered[-1], ordered[-2], hi
    else:
        return None
    forward, back = SCALES[axis.scale]
    beyond = back(2 * forward(edge) - forward(inner))
    if not (math.isfinite(beyond) and lo <= beyond <= hi):
        beyond = limit
    beyond = float(f"{beyond:.6g}")  # a readable trial name; far below any step
    return beyond if beyond not in ordered else None


RunTrial = Callable[[str, dict, dict], Scores]  # (label, method entry, point) -> its scores


def configured(entry: dict, axes: list[Axis], point: dict[str, float]) -> dict:
    """A copy of a method entry with the point's value set on each of its axes."""
    out = copy.deepcopy(entry)
    for axis in axes:
        if axis.name in point:
            axis.apply(out, point[axis.name])
    return out


def tune_axis(
    label: str,
    entry: dict,
    axes: list[Axis],
    axis: Axis,
    point: dict[str, float],
    run: RunTrial,
    carried: dict | None = None,
    known: Sequence[dict] = (),
) -> tuple[list[dict], list[dict]]:
    """One axis at `point` (the earlier axes' choices): its new trials, extended past the
    edge while the choice sits there and the limits allow, and the line the axis's choice is
    made on. `carried`, the earlier axis's chosen trial, lies on this axis at its own value
    (the entry's, or an earlier pass's choice): when that value is not among the axis's, it
    is on the line too (not rerun). A setting among `known` (the method's earlier trials) is
    put on the line as that trial, not run again."""
    trials: list[dict] = []
    on_axis: list[dict] = []
    pending = list(axis.values)
    while pending:
        for value in pending:
            at = {**point, axis.name: value}
            method = configured(entry, axes, at)
            if earlier := [t for t in known if t["entry"] == method and axis.name in t["point"]]:
                on_axis.append(earlier[-1])  # the latest: its name gives every axis
                continue
            extension = value not in axis.values
            trials.append(
                {"method": label, "axis": axis.name, "extension": extension, "point": at}
                | {"second_pass": axis.name in point, "entry": method}
                | {"scores": {label: run(label, method, at)}}
            )
            on_axis.append(trials[-1])
        chosen = by_name(on_axis, select(on_axis)[label])["point"][axis.name]
        beyond = next_beyond(axis, [t["point"][axis.name] for t in on_axis], chosen)
        pending = [] if beyond is None else [beyond]
    tried = [t["point"][axis.name] for t in on_axis]
    if chosen in (min(tried), max(tried)):  # the choice sits at a limit: say so
        next(t for t in on_axis if t["point"][axis.name] == chosen)["at_limit"] = True
    own = point.get(axis.name, axis.value_in(entry))
    skipped = own is not None and own not in axis.values
    line = [carried] if carried and skipped and carried not in on_axis else []
    return trials, line + on_axis


def by_name(trials: list[dict], name: str) -> dict:
    return next(t for t in trials if trial_name(t["point"]) == name)


def reproduces(first: Scores, second: Scores) -> bool:
    """A choice holds on the second seed when its final loss is at most CONFIRM_TOLERANCE
    worse and, if it met the drift cap, the two seeds' mean drift still meets it."""
    if second["final_loss"] > first["final_loss"] * (1 + CONFIRM_TOLERANCE):
        return False
    return first["drift"] > MAX_DRIFT or (first["drift"] + second["drift"]) / 2 <= MAX_DRIFT


def confirm(
    label: str, line: list[dict], others: list[dict], run: RunTrial
) -> tuple[dict, list[dict]]:
    """The rule's choice, rerun on CONFIRM_SEED: a setting one seed's luck chose (e.g. a rate
    at the edge of divergence) is struck and the rule chooses again among the rest, first the
    last axis's `line`, then the method's earlier trials, until a choice reproduces. Returns
    the confirmed trial (the rule's unconfirmed choice if every setting is struck) and the
    confirming runs."""
    candidates = line + [t for t in others if t not in line]
    struck: list[dict] = []
    checks: list[dict] = []
    while remaining := [t for t in candidates if t["entry"] not in struck]:
        chosen = by_name(remaining, select(remaining)[label])
        point = {**chosen["point"], "seed": CONFIRM_SEED}
        scores = run(label, chosen["entry"], point)
        held = reproduces(chosen["scores"][label], scores)
        checks.append(
            {"method": label, "confirms": trial_name(chosen["point"]), "reproduces": held}
            | {"point": point, "entry": chosen["entry"], "scores": {label: scores}}
        )
        if held:
            return chosen, checks
        struck.append(chosen["entry"])
    return by_name(line, select(line)[label]), checks


def tune_method(
    label: str, entry: dict, axes: list[Axis], run: RunTrial
) -> tuple[list[dict], dict, list[dict]]:
    """Tune one method along `axes` in order; returns its trials, the confirmed choice and
    the confirming runs."""
    trials: list[dict] = []
    line: list[dict] = []
    for axis in axes:
        carried = by_name(line, select(line)[label]) if line else None
        point = carried["point"] if carried else {}
        mine, line = tune_axis(label, entry, axes, axis, point, run, carried, trials)
        trials += mine
    return trials, *confirm(label, line, trials, run)


@dataclass
class Tuned:
    """A grid's outcome: every trial, the chosen trial's name and entry per method label,
    and the runs that confirmed (or struck) the choices on the second seed."""

    trials: list[dict]
    chosen: dict[str, str]
    entries: dict[str, dict]
    confirmations: list[dict]


def method_entry(item: Any) -> dict:
    """A run config's method item (a name or a mapping) as a mapping."""
    return {"name": item} if isinstance(item, str) else copy.deepcopy(item)


def parse_axes(spec: dict) -> list[Axis]:
    return [Axis.parse(a, f"axes[{i}]") for i, a in enumerate(spec["axes"])]


def tune_axes(spec: dict, run: RunTrial) -> Tuned:
    """Every method of an `axes` grid: its trials, choice, chosen entry and confirming runs."""
    axes = parse_axes(spec)
    tuned = Tuned([], {}, {}, [])
    for item in spec["methods"]:
        entry = method_entry(item)
        label = entry.get("label") or entry["name"]
        trials, chosen, checks = tune_method(label, entry, axes, run)
        tuned.trials += trials
        tuned.chosen[label] = trial_name(chosen["point"])
        tuned.entries[label] = chosen["entry"]
        tuned.confirmations += checks
    return tuned


# -- fixed grids ------------------------------------------------------------------------------
def earlier_trials(root: Path) -> list[Path]:
    """Trial run directories of every grid: a (method, seed) run with identical settings is
    copied from them rather than trained again. Another `crma tune` may be writing beside
    this one: its temporary directories (dot names) are skipped, and a directory renamed
    away mid-walk is passed over (os.walk ignores it) instead of failing this grid."""
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if "config.yaml" in files:
            found.append(Path(here))
    return sorted(found)


def grid_points(spec: dict) -> list[dict]:
    """`grid: {key: [values]}` (every combination) or `points: [{key: value, ...}]` (as listed)."""
    if "points" in spec:
        return list(spec["points"])
    keys = list(spec["grid"])
    return [
        dict(zip(keys, values)) for values in itertools.product(*(spec["grid"][k] for k in keys))
    ]


def fixed(spec: dict) -> list[str]:
    """Overrides shared by every trial; the split is always validation."""
    shared = [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()]
    return shared + ["corpus.split=validation"]


def trial_configs(spec: dict) -> list[tuple[dict, Any]]:
    """(point, resolved run config) per declared trial; a bad key or option fails here, before
    any run. For an `axes` grid: every method at every declared value of every axis (the
    other axes at the method's own settings, an axis given again once); extensions come
    later, from the scores."""
    if "axes" not in spec:
        out = []
        for point in grid_points(spec):
            own = [f"{k}={json.dumps(v)}" for k, v in point.items() if k != "trial"]
            out.append((point, load_config(spec["config"], fixed(spec) + own)))
        return out
    axes = parse_axes(spec)
    out = []
    for item in spec["methods"]:
        for axis in [a for i, a in enumerate(axes) if a not in axes[:i]]:
            for value in axis.values:
                entry = method_entry(item)
                axis.apply(entry, value)
                point = {"methods": [entry], axis.name: value}
                out.append((point, axis_config(spec, entry)))
    return out


def axis_config(spec: dict, entry: dict, seed: int | None = None) -> Any:
    """The run config of one method entry of an `axes` grid (on `seed` instead of the grid's)."""
    seeds = [] if seed is None else [f"seeds=[{seed}]"]
    return load_config(spec["config"], [*fixed(spec), f"methods={json.dumps([entry])}", *seeds])


# -- running and writing ------------------------------------------------------------------------
def run_trial(config: Any, out: Path, root: Path, results: Path) -> dict:
    """A trial's report: read back if it finished earlier, else run, copying identical units
    from earlier trials, here or exported. Then exported (without weights) to
    <results>/runs/, the same path as under `root`: committed with the results, a finished
    trial outlives the machine it ran on, and a later `crma tune` elsewhere copies it."""
    finished = out / "report.json"
    if finished.is_file():
        report = json.loads(finished.read_text())
    else:
        exported = earlier_trials(results / EXPORTED)
        report = ProtocolRun(config, out, reuse=earlier_trials(root) + exported).run()
    export_results(out, results / EXPORTED / out.relative_to(root))
    return report


def run_fixed(spec: dict, out: Path, root: Path, results: Path) -> Tuned:
    trials = []
    for point, config in trial_configs(spec):
        trial_out = out / trial_name(point)
        report = run_trial(config, trial_out, root, results)
        trials.append({"point": point, "scores": score(report), "run_dir": str(trial_out)})
        print(f"trial {trial_name(point)}: {json.dumps(trials[-1]['scores'])}", flush=True)
    return Tuned(trials, select(trials), {}, [])


def protocol_runner(spec: dict, out: Path, root: Path, results: Path) -> RunTrial:
    def run(label: str, entry: dict, point: dict) -> Scores:
        trial_out = out / label / trial_name(point)
        config = axis_config(spec, entry, point.get("seed"))
        scores = score(run_trial(config, trial_out, root, results))[label]
        print(f"trial {label} {trial_name(point)}: {json.dumps(scores)}", flush=True)
        return scores

    return run


def write_results(grid: Path, spec: dict, tuned: Tuned, results: Path) -> None:
    """<results>/<grid name>.json (every trial, its scores, the choices, the confirming runs)
    and .md (the tables)."""
    write_json(
        results / f"{grid.stem}.json",
        {
            "grid_file": str(grid),
            "fixed": fixed(spec),
            "trials": tuned.trials,
            "selected": tuned.chosen,
            "selected_entries": tuned.entries,
            "confirmations": tuned.confirmations,
        },
    )
    lines = [
        f"# Tuning trials: {grid.stem}",
        "",
        f"Grid file `{grid}`; every trial evaluates on the validation split (from `spare`).",
        "Trials marked *(extension)* were added because the choice sat at an edge of the grid;",
        "*(chosen at the … limit)*: the choice sits at the axis's declared limit;",
        "*(second pass)*: an axis searched again at the later axes' choices.",
        "",
        "| trial | method | drift (%) | loss just after training (mean) | final loss (mean) |",
        "|---|---|---|---|---|",
    ]
    last = {c["method"]: c for c in tuned.confirmations}
    unconfirmed = {label for label, c in last.items() if not c["reproduces"]}
    for t in tuned.trials:
        name = trial_name(t["point"]) + (" *(extension)*" if t.get("extension") else "")
        name += f" *(chosen at the {t['axis']} limit)*" if t.get("at_limit") else ""
        name += " *(second pass)*" if t.get("second_pass") else ""
        for label, s in t["scores"].items():
            lines.append(
                f"| {name} | {label} | {s['drift']:+.3f} | {s['plasticity_loss']:.4f} | "
                f"{s['final_loss']:.4f} |"
            )
    lines += [
        "",
        f"Selected (lowest final loss among drift <= {MAX_DRIFT} %, else least drift):",
        "",
        *(
            f"- {label}: {name}"
            + (f" → `{json.dumps(tuned.entries[label])}`" if label in tuned.entries else "")
            + (" (no setting reproduced: unconfirmed)" if label in unconfirmed else "")
            for label, name in tuned.chosen.items()
        ),
    ]
    if tuned.confirmations:
        lines += confirmation_lines(tuned.confirmations)
    write_text(results / f"{grid.stem}.md", "\n".join(lines) + "\n")


def confirmation_lines(checks: list[dict]) -> list[str]:
    """The confirming runs as a table: a choice that does not reproduce is struck."""
    lines = [
        "",
        f"Each choice rerun on seed {CONFIRM_SEED}: it holds when its final loss is at most "
        f"{CONFIRM_TOLERANCE:.0%} worse and the two seeds' mean drift still meets the cap; "
        "otherwise it is struck and the rule chooses again among the rest.",
        "",
        f"| confirms | method | drift (%) on seed {CONFIRM_SEED} | final loss (mean) | holds |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        for label, s in c["scores"].items():
            held = "yes" if c["reproduces"] else "no: struck"
            lines.append(
                f"| {c['confirms']} | {label} | {s['drift']:+.3f} | {s['final_loss']:.4f} "
                f"| {held} |"
            )
    return lines


GRID_KEYS = ("config", "set", "methods", "axes", "grid", "points")


def load_grid(path: Path) -> dict:
    """A grid file, its keys checked and every declared trial resolved (a typo in a method,
    an option or an override fails here, before hours of runs)."""
    spec = read_yaml(path, "grid")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with config and axes, grid or points")
    if unknown := sorted(set(spec) - set(GRID_KEYS)):
        raise UserError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(GRID_KEYS)}")
    kinds = [k for k in ("axes", "grid", "points") if k in spec]
    if "config" not in spec or len(kinds) != 1 or ("axes" in spec) != ("methods" in spec):
        raise UserError(
            f"{path}: needs `config` and exactly one of `axes` (with `methods`), `grid`, `points`"
        )
    try:
        trial_configs(spec)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return spec


def tune(grid: Path, out: Path, results: Path) -> dict[str, str]:
    """Run (or read back) every trial of `grid` under out/<grid name>/, write the results and
    return the chosen trial per method label."""
    spec = load_grid(grid)
    trials_dir = out / grid.stem
    if "axes" in spec:
        tuned = tune_axes(spec, protocol_runner(spec, trials_dir, out, results))
    else:
        tuned = run_fixed(spec, trials_dir, out, results)
    write_results(grid, spec, tuned, results)
    return tuned.chosen
