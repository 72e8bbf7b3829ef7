"""The evaluations `crma run` adds after each method/seed: routing on the holdouts
(routing.json, `eval.routing`) and QA accuracy (qa.json, `eval.qa`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crma.eval.loss import mean_token_loss
from crma.eval.qa import QASettings, corpus_items, evaluate_qa, write_eval
from crma.fileio import write_json
from crma.routing.metrics import routing_metrics
from crma.routing.router import Router, RouteSettings, adapter_key, refresh_router

if TYPE_CHECKING:
    from crma.continual import ContinualModel
    from crma.protocol.config import EvalConfig
    from crma.protocol.data import DomainData


STORED_ROUTERS = ("centroid", "fast")  # the routers a stack stores (route questions among them)


def routers_to_compare(routers: list[str], needs_task_id: bool) -> list[str]:
    """The configured routers worth evaluating: arrow and loss compare per-domain adapters."""
    return [k for k in routers if needs_task_id or k in STORED_ROUTERS]


def protocol_evals(
    cm: ContinualModel,
    domains: list[DomainData],
    run_dir: Path,
    eval_cfg: EvalConfig,
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
    rebuilt = (eval_cfg.routing or eval_cfg.qa) and refresh_router(
        cm, {d.name: d.train for d in domains}, {d.name: d.route for d in domains}
    )
    # What was measured with another router is measured again.
    if cm.method.needs_task_id and stale(run_dir / "qa.json", eval_cfg.route_questions, rebuilt):
        (run_dir / "qa.json").unlink()
    if eval_cfg.routing:
        path = run_dir / "routing.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if stale(path, eval_cfg.route_questions, rebuilt):
            done = {k: v for k, v in done.items() if k not in STORED_ROUTERS}
        wanted = routers_to_compare(eval_cfg.routers, cm.method.needs_task_id)
        missing = [kind for kind in wanted if kind not in done]
        if missing:  # a run reused from elsewhere may lack some of the configured routers
            print(f"{tag} routing: evaluating {', '.join(missing)}", flush=True)
            section = routing_section(
                cm, domains, dataclasses.replace(eval_cfg, routers=missing), cache
            )
            write_json(path, {**done, **section})
            write_json(cache_path, cache)
    if eval_cfg.qa and not (run_dir / "qa.json").is_file():
        settings = QASettings(probes_limit=eval_cfg.qa_probes, mmlu_limit=eval_cfg.qa_mmlu)
        items = corpus_items([d.name for d in domains], settings)
        if items:
            start = time.perf_counter()

            def domain_done(domain: str) -> None:
                write_json(cache_path, cache)
                took = time.perf_counter() - start
                print(f"{tag} QA: {domain} scored ({took:.0f} s so far)", flush=True)

            result = evaluate_qa(cm, items, RouteSettings(), settings, cache, domain_done)
            write_eval({**result, "route_questions": eval_cfg.route_questions}, run_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def stale(path: Path, route_questions: int, rebuilt: bool = False) -> bool:
    """Whether routing.json or qa.json at `path` was measured with other stored routers than
    the ones `eval.route_questions` asks for (or than the router just `rebuilt`)."""
    if not path.is_file():
        return False
    return rebuilt or json.loads(path.read_text()).get("route_questions", 0) != route_questions


def routing_section(
    cm: ContinualModel, domains: list[DomainData], eval_cfg: EvalConfig, cache: dict[str, Any]
) -> dict[str, Any]:
    """Per router: top-1 per domain on the holdouts, confusion, and the last row of the loss
    matrix with each holdout example evaluated under the adapters its route picks."""
    holdouts = {d.name: [e["input_ids"] for e in d.holdout] for d in domains}
    out: dict[str, Any] = {
        "method": cm.method.name,
        "needs_task_id": cm.method.needs_task_id,
        "route_questions": eval_cfg.route_questions,  # stored in the centroid routers
    }
    for kind in eval_cfg.routers:
        router = Router(cm, RouteSettings(router=kind))
        metrics = routing_metrics(router, holdouts)
        metrics["routed_final_loss"] = {
            d.name: routed_loss(cm, router, d, metrics["routes"][d.name], eval_cfg, cache)
            for d in domains
        }
        out[kind] = metrics
    return out


def routed_loss(
    cm: ContinualModel,
    router: Router,
    domain: DomainData,
    routed: list[str | None],
    eval_cfg: EvalConfig,
    cache: dict[str, Any],
) -> float:
    """Token-weighted holdout loss of `domain` when each example uses its routed adapters."""
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
