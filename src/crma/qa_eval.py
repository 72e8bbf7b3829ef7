"""Answering questions across all domains: QA accuracy under oracle, routed and ablated weights.

For every domain of a stack, multiple-choice items (the corpus's continuation probes and MMLU
subject subsets, or the user's own) are scored by log-likelihood (`crma.data.qa`) under:

- `base`: the base model alone (no adapter, CRMA backbone off);
- `oracle`: the domain's own adapters (the method's `eval_adapters`) with the backbone;
- `routed`: the adapters the router picks for each item's prompt (no task id given);
- `backbone_off`: the oracle adapters with the CRMA backbone switched off on the same weights
  (the on/off ablation; only for methods with a backbone).

Accuracy comes with Wilson 95% intervals. Also the protocol hook (`protocol_evals`) that adds
routing metrics and QA accuracy to a `crma run`, and the report sections built from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crma.errors import UserError
from crma.fileio import write_json, write_text
from crma.route import (
    FALLBACK,
    ROUTERS,
    Route,
    Router,
    RouteSettings,
    adapter_key,
    plot_confusion,
    refresh_router,
    routing_metrics,
)
from crma.settings import Settings, setting

if TYPE_CHECKING:
    from crma.continual import ContinualModel

CONDITIONS = ("base", "oracle", "routed", "backbone_off")
KINDS = ("probes", "mmlu")


@dataclass
class QASettings(Settings):
    """Which items are scored and how."""

    probes_limit: int = setting(100, "continuation probes per domain (first N)", ge=0)
    mmlu_limit: int = setting(
        100, "MMLU questions per domain, spread evenly over its subjects", ge=0
    )
    batch_size: int = setting(8, "sequences per forward pass", ge=1)
    max_length: int = setting(512, "tokens per prompt + option", ge=2)


# -- items ------------------------------------------------------------------------------------------
def read_items(path: str | Path) -> list[dict[str, Any]]:
    """JSONL items: {prompt, options, answer} (continuation) or {question, choices, answer}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: probe file not found")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
        options = item.get("options", item.get("choices"))
        if not (("prompt" in item) ^ ("question" in item)) or not isinstance(options, list):
            raise UserError(
                f"{path}:{n}: an item needs prompt+options or question+choices, and answer"
            )
        if not isinstance(item.get("answer"), int) or not 0 <= item["answer"] < len(options):
            raise UserError(f"{path}:{n}: answer must be the index of the right option")
        items.append({"id": item.get("id", f"{path.stem}-{n}"), **item})
    return items


def spread(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` items evenly spaced over the list (MMLU lists are grouped by subject)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def corpus_items(domains: list[str], settings: QASettings) -> dict[str, dict[str, list]]:
    """Probes and MMLU items of every domain that is one of the embedded corpus's."""
    from crma.data.corpus import DOMAINS, corpus_file

    out = {}
    for d in domains:
        if d in DOMAINS:
            out[d] = {
                "probes": read_items(corpus_file(d, "probes"))[: settings.probes_limit],
                "mmlu": spread(read_items(corpus_file(d, "mmlu")), settings.mmlu_limit),
            }
    return out


# -- scoring ------------------------------------------------------------------------------------------
@contextmanager
def backbone_state(cm: ContinualModel, on: bool) -> Iterator[None]:
    backbone = cm.engine.backbone
    before = backbone.enabled if backbone is not None else None
    if backbone is not None:
        backbone.enabled = on
    try:
        yield
    finally:
        if backbone is not None:
            backbone.enabled = before


def predict(
    cm: ContinualModel,
    items: list[dict[str, Any]],
    adapters: str | list[str] | None,
    backbone_on: bool,
    settings: QASettings,
    cache: dict[str, Any] | None = None,
) -> list[int]:
    """Chosen option per item with these weights; reused from `cache` when the weights match."""
    from crma.data.qa import score_choices

    engine = cm.engine
    with backbone_state(cm, backbone_on):
        ids = hashlib.sha256("\n".join(str(i["id"]) for i in items).encode()).hexdigest()[:16]
        key = f"qa:{ids}:{settings.max_length}:{engine.fingerprint(adapters)}"
        if cache is not None and key in cache:
            return cache[key]
        model = engine.model
        was_training = model.training
        model.eval()
        with engine.using(adapters):
            preds = score_choices(
                model, engine.tokenizer, items, settings.batch_size, settings.max_length
            )
        model.train(was_training)
    if cache is not None:
        cache[key] = preds
    return preds


def tally(items: list[dict[str, Any]], preds: list[int]) -> dict[str, Any]:
    from crma.data.qa import wilson_interval

    hits = "".join("1" if p == i["answer"] else "0" for i, p in zip(items, preds))
    correct = hits.count("1")
    lo, hi = wilson_interval(correct, len(items))
    return {
        "correct": correct,
        "total": len(items),
        "accuracy": correct / max(1, len(items)),
        "ci95": [lo, hi],
        "hits": hits,  # per item, for paired comparisons between methods
    }


def routed_predictions(
    cm: ContinualModel,
    items: list[dict[str, Any]],
    routes: list[Route],
    router: Router,
    oracle: tuple[Any, list[int]],
    settings: QASettings,
    cache: dict[str, Any] | None,
) -> list[int]:
    """Each item scored with the adapters its route picks; items routed to the oracle's
    adapters reuse the oracle's predictions (same weights, same answer)."""
    oracle_key, oracle_preds = oracle
    preds = list(oracle_preds)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(routes):
        groups.setdefault(adapter_key(router.adapters_for(r)), []).append(i)
    for key, rows in groups.items():
        if key == oracle_key:
            continue
        adapters = list(key) if len(key) > 1 else (key[0] if key else None)
        sub = predict(cm, [items[i] for i in rows], adapters, True, settings, cache)
        for i, p in zip(rows, sub):
            preds[i] = p
    return preds


def evaluate_qa(
    cm: ContinualModel,
    items: dict[str, dict[str, list[dict[str, Any]]]],
    route: RouteSettings | None = None,
    settings: QASettings | None = None,
    cache: dict[str, Any] | None = None,
    on_domain_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy per condition, domain and item kind: {conditions, results[c][d][kind], routes}.

    `on_domain_done(domain)` runs after each domain (e.g. to save `cache`, so a killed run
    resumes, and to report progress).
    """
    from crma.data.qa import prompt_and_options

    s = settings or QASettings()
    method = cm.method
    conditions = ["base", "oracle"]
    if method.needs_task_id:
        conditions.append("routed")
    if cm.engine.backbone is not None:
        conditions.append("backbone_off")
    router = Router(cm, route) if "routed" in conditions else None
    results: dict[str, Any] = {c: {} for c in conditions}
    route_hits: dict[str, dict[str, Any]] = {}
    for domain, kinds in items.items():
        adapters = method.eval_adapters(domain)
        for c in conditions:
            results[c].setdefault(domain, {})
        for kind, its in kinds.items():
            if not its:
                continue
            oracle = predict(cm, its, adapters, True, s, cache)
            results["base"][domain][kind] = tally(its, predict(cm, its, None, False, s, cache))
            results["oracle"][domain][kind] = tally(its, oracle)
            if "backbone_off" in conditions:
                off = predict(cm, its, adapters, False, s, cache)
                results["backbone_off"][domain][kind] = tally(its, off)
            if router is not None:
                routes = router.route_texts([prompt_and_options(i)[0] for i in its])
                preds = routed_predictions(
                    cm, its, routes, router, (adapter_key(adapters), oracle), s, cache
                )
                results["routed"][domain][kind] = tally(its, preds)
                route_hits.setdefault(domain, {})[kind] = {
                    "to_own_domain": sum(r.domain == domain for r in routes) / len(routes),
                    "fallback": sum(r.domain is None for r in routes) / len(routes),
                }
        if on_domain_done is not None:
            on_domain_done(domain)
    return {
        "method": method.name,
        "domains": list(items),
        "conditions": conditions,
        "router": (route or RouteSettings()).router if router else None,
        "results": results,
        "routing_of_items": route_hits,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """Rows: conditions; columns: domain × item kind; cells: accuracy % [Wilson 95%]."""
    cols = [
        (d, k)
        for d in result["domains"]
        for k in KINDS
        if k in result["results"]["oracle"].get(d, {})
    ]
    head = "| condition | " + " | ".join(f"{d} {k}" for d, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for c in result["conditions"]:
        cells = []
        for d, k in cols:
            t = result["results"][c][d].get(k)
            cells.append("–" if t is None else _cell(t))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(t: dict[str, Any]) -> str:
    lo, hi = t["ci95"]
    return f"{100 * t['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write_eval(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """qa.json and qa.md in `out_dir`."""
    out_dir = Path(out_dir)
    write_json(out_dir / "qa.json", result)
    text = (
        f"# QA accuracy (%) with Wilson 95% intervals — method {result['method']}\n\n"
        "Items scored by mean per-token log-likelihood of each option (chance 25%).\n"
        "base: no adapter, backbone off; oracle: the domain's adapters; routed: the router's "
        "choice; backbone_off: oracle adapters with the CRMA backbone switched off.\n\n"
        + markdown_table(result)
        + "\n"
    )
    write_text(out_dir / "qa.md", text)
    return out_dir / "qa.json", out_dir / "qa.md"


# -- inside `crma run` ---------------------------------------------------------------------------------
def routers_to_compare(routers: list[str], needs_task_id: bool) -> list[str]:
    """The configured routers worth evaluating: arrow and loss compare per-domain adapters."""
    return [k for k in routers if needs_task_id or k == "centroid"]


def protocol_evals(
    cm: ContinualModel,
    domains: list[Any],
    run_dir: Path,
    eval_cfg: Any,
    loss_rows: list[list[float | None]],
    cache: dict[str, Any],
    cache_path: Path,
    accelerator: Any = None,
    tag: str = "",
) -> None:
    """After a method/seed run: routing.json (eval.routing) and qa.json (eval.qa) in `run_dir`.

    Runs on the main process only; files already there are kept (the run resumes). Progress
    lines start with `tag`.
    """
    if accelerator is not None and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    if getattr(eval_cfg, "routing", False):
        path = run_dir / "routing.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if "centroid" in eval_cfg.routers and refresh_router(
            cm, {d.name: d.train for d in domains}
        ):
            done.pop("centroid", None)  # measured with the older router
        wanted = routers_to_compare(eval_cfg.routers, cm.method.needs_task_id)
        missing = [kind for kind in wanted if kind not in done]
        if missing:  # a run reused from elsewhere may lack some of the configured routers
            print(f"{tag} routing: evaluating {', '.join(missing)}", flush=True)
            section = routing_section(
                cm, domains, dataclasses.replace(eval_cfg, routers=missing), cache
            )
            write_json(path, {**done, **section})
            write_json(cache_path, cache)
    if getattr(eval_cfg, "qa", False) and not (run_dir / "qa.json").is_file():
        settings = QASettings(probes_limit=eval_cfg.qa_probes, mmlu_limit=eval_cfg.qa_mmlu)
        items = corpus_items([d.name for d in domains], settings)
        if items:
            start = time.perf_counter()

            def domain_done(domain: str) -> None:
                write_json(cache_path, cache)
                took = time.perf_counter() - start
                print(f"{tag} QA: {domain} scored ({took:.0f} s so far)", flush=True)

            write_eval(
                evaluate_qa(cm, items, RouteSettings(), settings, cache, domain_done), run_dir
            )
    if accelerator is not None:
        accelerator.wait_for_everyone()


def routing_section(
    cm: ContinualModel, domains: list[Any], eval_cfg: Any, cache: dict[str, Any]
) -> dict[str, Any]:
    """Per router: top-1 per domain on the holdouts, confusion, and the last row of the loss
    matrix with each holdout example evaluated under the adapters its route picks."""
    holdouts = {d.name: [e["input_ids"] for e in d.holdout] for d in domains}
    out: dict[str, Any] = {"method": cm.method.name, "needs_task_id": cm.method.needs_task_id}
    for kind in getattr(eval_cfg, "routers", ["centroid"]):
        router = Router(cm, RouteSettings(router=kind))
        metrics = routing_metrics(router, holdouts)
        metrics["routed_final_loss"] = {
            d.name: routed_loss(cm, router, d, metrics["routes"][d.name], eval_cfg, cache)
            for d in domains
        }
        out[kind] = metrics
    return out


def routed_loss(
    cm: ContinualModel, router: Router, domain: Any, routed: list[str | None], eval_cfg, cache
) -> float:
    """Token-weighted holdout loss of `domain` when each example uses its routed adapters."""
    from crma.evaluate import mean_token_loss

    if not cm.method.needs_task_id:
        routed = [domain.name] * len(routed)  # no task id: the same adapters for every domain
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(routed):
        groups.setdefault(adapter_key(cm.method.eval_adapters(d) if d else None), []).append(i)
    total = tokens = 0.0
    for key, rows in groups.items():
        adapters = list(key) if len(key) > 1 else (key[0] if key else None)
        examples = [domain.holdout[i] for i in rows]
        n = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
        whole = len(rows) == len(domain.holdout)  # same key as the loss matrix's cells
        ckey = (
            f"{domain.name}:" if whole else f"routed:{domain.name}:{_rows_id(rows)}:"
        ) + cm.engine.fingerprint(adapters)
        if ckey not in cache:
            cache[ckey] = mean_token_loss(cm.engine, examples, adapters, eval_cfg.batch_size)
        total += cache[ckey] * n
        tokens += n
    return total / tokens


def _rows_id(rows: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()[:12]


# -- report sections -------------------------------------------------------------------------------------
def answer_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """`routing` and `qa` sections of report.json from the runs' routing.json / qa.json files."""
    domains, out = report["domains"], {}
    routing, qa, qa_runs = {}, {}, {}
    for label, m in report["methods"].items():
        per_seed = {s: run_dir / label / f"seed-{s}" for s in m["per_seed"]}
        r = {
            s: json.loads((p / "routing.json").read_text())
            for s, p in per_seed.items()
            if (p / "routing.json").is_file()
        }
        if r:
            routing[label] = _routing_summary(r, m, domains)
        q = {
            s: json.loads((p / "qa.json").read_text())
            for s, p in per_seed.items()
            if (p / "qa.json").is_file()
        }
        if q:
            qa[label], qa_runs[label] = _qa_summary(q), q
    if routing:
        out["routing"] = routing
    if qa:
        out["qa"] = qa
        paired = _qa_paired(qa_runs)
        if paired:
            out["qa_paired"] = paired
    return out


QA_REFERENCES = ("frozen", "naive")  # the QA targets compare against these


def _qa_paired(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method minus frozen and naive on the same QA items (seeds pooled), each side as
    deployed: routed where the method needs a task id, else its one model (oracle).

    runs: method label -> seed -> that unit's qa.json.
    """
    from crma.data.qa import paired_difference

    def deployed(method: dict[str, Any]) -> str:
        return "routed" if "routed" in next(iter(method.values()))["conditions"] else "oracle"

    def hits(
        method: dict[str, Any], seeds: list[str], d: str, kind: str, condition: str | None = None
    ) -> str | None:
        condition = condition or deployed(method)
        cells = [method[s]["results"][condition][d].get(kind) for s in seeds]
        return "".join(c["hits"] for c in cells) if all(c and "hits" in c for c in cells) else None

    out, done = [], set()
    for ref in (r for r in QA_REFERENCES if r in runs):
        for label, mine in runs.items():
            seeds = sorted(set(mine) & set(runs[ref]))
            if label == ref or not seeds or (ref, label) in done:
                continue  # frozen − naive is shown, naive − frozen would only flip its sign
            done.add((label, ref))
            cells: dict[str, Any] = {}
            for d in mine[seeds[0]]["domains"]:
                for kind in KINDS:
                    a, b = hits(mine, seeds, d, kind), hits(runs[ref], seeds, d, kind)
                    if a and b:
                        cells.setdefault(d, {})[kind] = paired_difference(a, b)
            if cells:
                conditions = [deployed(mine), deployed(runs[ref])]
                out.append(
                    {
                        "method": label,
                        "minus": ref,
                        "conditions": conditions,
                        "seeds": seeds,
                        "results": cells,
                    }
                )
    for label, mine in runs.items():  # the on/off ablation: the same weights, backbone off
        seeds = sorted(mine)
        if "backbone_off" not in mine[seeds[0]]["conditions"]:
            continue
        cells = {}
        for d in mine[seeds[0]]["domains"]:
            for kind in KINDS:
                a = hits(mine, seeds, d, kind, "oracle")
                b = hits(mine, seeds, d, kind, "backbone_off")
                if a and b:
                    cells.setdefault(d, {})[kind] = paired_difference(a, b)
        if cells:
            out.append(
                {
                    "method": label,
                    "minus": f"{label} backbone off",
                    "conditions": ["oracle", "backbone_off"],
                    "seeds": seeds,
                    "results": cells,
                }
            )
    return out


def _routing_summary(per_seed: dict[str, Any], m: dict[str, Any], domains: list[str]) -> dict:
    routers = [k for k in ROUTERS if any(k in r for r in per_seed.values())]
    out = {}
    for kind in routers:
        runs = {s: r[kind] for s, r in per_seed.items() if kind in r}
        drift_routed = {}
        for s, r in runs.items():
            L = m["per_seed"][s]["loss_matrix"]
            drift_routed[s] = (
                statistics.fmean(
                    100 * (r["routed_final_loss"][d] - L[i + 1][i]) / L[i + 1][i]
                    for i, d in enumerate(domains[:-1])
                )
                if len(domains) > 1
                else 0.0
            )
        first = next(iter(runs.values()))
        confusion = [
            [sum(r["confusion"][i][j] for r in runs.values()) for j in range(len(first["labels"]))]
            for i in range(len(first["domains"]))
        ]
        out[kind] = {
            "top1": {
                d: statistics.fmean(r["top1"][d] for r in runs.values()) for d in first["domains"]
            },
            "labels": first["labels"],
            "domains": first["domains"],
            "confusion": confusion,
            "drift_routed_mean": statistics.fmean(drift_routed.values()),
            "drift_oracle_mean": statistics.fmean(m["per_seed"][s]["drift"] for s in runs),
            "drift_routed_per_seed": drift_routed,
        }
    return out


def _qa_summary(per_seed: dict[str, Any]) -> dict[str, Any]:
    """Counts pooled over seeds per condition, domain and kind, with Wilson intervals."""
    from crma.data.qa import wilson_interval

    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {
        "domains": first["domains"],
        "conditions": first["conditions"],
        "seeds": list(per_seed),
        "results": {},
    }
    for c in first["conditions"]:
        for d in first["domains"]:
            for kind in first["results"][c].get(d, {}):
                cells = [q["results"][c][d][kind] for q in per_seed.values()]
                correct, total = sum(x["correct"] for x in cells), sum(x["total"] for x in cells)
                lo, hi = wilson_interval(correct, total)
                out["results"].setdefault(c, {}).setdefault(d, {})[kind] = {
                    "correct": correct,
                    "total": total,
                    "accuracy": correct / max(1, total),
                    "ci95": [lo, hi],
                }
    return out


def answer_markdown(report: dict[str, Any]) -> list[str]:
    """report.md lines for the routing and QA sections (nothing when absent)."""
    out: list[str] = []
    if report.get("routing"):
        out += [
            "",
            "## Routing (holdout top-1 per domain; drift under routed vs oracle choice)",
            "",
            "| method | router | "
            + " | ".join(report["domains"])
            + " | drift routed | drift oracle |",
            "|" + "---|" * (len(report["domains"]) + 4),
        ]
        for label, routers in report["routing"].items():
            for kind, r in routers.items():
                cells = [f"{100 * r['top1'].get(d, 0):.1f}" for d in report["domains"]]
                out.append(
                    f"| {label} | {kind} | "
                    + " | ".join(cells)
                    + f" | {r['drift_routed_mean']:+.2f} | {r['drift_oracle_mean']:+.2f} |"
                )
    if report.get("qa"):
        out += ["", "## QA accuracy (%) [Wilson 95%], counts pooled over seeds", ""]
        for label, q in report["qa"].items():
            out += [f"**{label}**", "", markdown_table(q), ""]
    if report.get("qa_paired"):
        out += [
            "## QA paired differences (points, 95% interval on the same items)",
            "",
            "| method | minus | conditions | "
            + " | ".join(f"{d} {k}" for d in report["domains"] for k in KINDS)
            + " |",
            "|" + "---|" * (3 + len(report["domains"]) * len(KINDS)),
        ]
        for p in report["qa_paired"]:
            cells = []
            for d in report["domains"]:
                for k in KINDS:
                    r = p["results"].get(d, {}).get(k)
                    cells.append("–" if r is None else _paired_cell(r))
            versus = " − ".join(p["conditions"])
            out.append(f"| {p['method']} | {p['minus']} | {versus} | " + " | ".join(cells) + " |")
    return out


def _paired_cell(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def plot_answers(run_dir: Path, report: dict[str, Any]) -> None:
    """plots/routing_<method>_<router>.png: confusion matrices summed over seeds."""
    for label, routers in report.get("routing", {}).items():
        for kind, r in routers.items():
            metrics = {**r, "router": kind}
            plot_confusion(
                metrics,
                run_dir / "plots" / f"routing_{label}_{kind}.png",
                f"{label}: router {kind} (holdouts, all seeds)",
            )


__all__ = ["CONDITIONS", "FALLBACK", "QASettings", "evaluate_qa", "protocol_evals"]
