"""What the dashboard shows, gathered from the served snapshot, the store and the metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crma.batching import steps_for
from crma.report.metrics import drift_per_domain
from crma.serve.jobs import route_file
from crma.serve.store import ACTIVE

if TYPE_CHECKING:
    from crma.serve.server import Server

REPORT_PLOTS = ("loss_matrix.png", "drift.png")  # the report's figures this view shows


def stack_view(server: Server) -> dict[str, Any]:
    """The base, the backbone as it is now, and every domain in training order."""
    snap = server.snapshot()
    cm = snap.model.cm
    manifest = cm.stack.manifest
    routed = routed_counts(server)
    total = sum(routed.values())
    domains = [
        {
            "name": entry["name"],
            "examples": entry.get("train_examples", entry.get("examples")),
            "steps": entry.get("steps"),
            "final_loss": entry.get("final_train_loss"),
            "added": entry.get("finished"),
            "job": entry.get("job"),
            "routed": routed.get(entry["name"], 0),
            "share": routed.get(entry["name"], 0) / total if total else None,
        }
        for entry in manifest["domains"]
    ]
    return {
        "stack": server.stack.resolve().name,
        "base": manifest["base_model"]["name"],
        "method": manifest["method"],
        "created": manifest.get("created"),
        "backbone": backbone_view(cm.engine.backbone),
        "domains": domains,
        "routed_total": total,
        "unrouted": {k: v for k, v in routed.items() if k not in snap.domains},
    }


@torch.no_grad()
def backbone_view(backbone) -> dict[str, Any] | None:
    """‖M‖₂ and the gate α of every layer of the served backbone (None: the method has none)."""
    if backbone is None:
        return None
    norms = torch.linalg.matrix_norm(backbone.mixing_matrices(), ord=2).tolist()
    return {
        "variant": backbone.config.variant,
        "streams": backbone.config.n_streams,
        "layers": len(norms),
        "norms": norms,
        "gates": backbone.gates().tolist(),
        "max_dev": max(abs(n - 1) for n in norms),
    }


def routed_counts(server: Server) -> dict[str, float]:
    """Answered `auto` requests by the domain that answered (from the Prometheus counter)."""
    counts: dict[str, float] = {}
    for sample in server.metrics.requests.collect()[0].samples:
        labels = sample.labels
        answered = labels["model"] == "auto" and labels["status"] == "200"
        if sample.name.endswith("_total") and answered:
            counts[labels["domain"]] = counts.get(labels["domain"], 0) + sample.value
    return counts


# -- jobs ---------------------------------------------------------------------------------------------
def jobs_view(server: Server) -> dict[str, list[dict[str, Any]]]:
    """Jobs newest first, split into in flight and finished."""
    jobs = [job_summary(server, j) for j in server.store.jobs(limit=100)]
    return {
        "active": [j for j in jobs if j["status"] in ACTIVE],
        "finished": [j for j in jobs if j["status"] not in ACTIVE],
    }


def job_summary(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    file = server.store.file(job["training_file"])
    hp = job["hyperparameters"]
    total = None
    if file is not None:
        total = steps_for(
            file["rows"], hp["batch_size"], hp["n_epochs"], server.scheduler.train.max_steps
        )
    route = route_file(job)
    return {
        **job,
        "file": file,
        "route_file": server.store.file(route) if route else None,
        "total_steps": total,
        "progress": progress(server, job["id"], total),
    }


def progress(server: Server, job_id: str, total: int | None) -> dict[str, Any]:
    """The last step, the fraction done and the ETA from the pace of the steps so far."""
    first, last, count = server.store.step_span(job_id)
    out: dict[str, Any] = {"step": last[0] if last else 0, "fraction": None, "eta_s": None}
    if total and last:
        out["fraction"] = min(1.0, last[0] / total)
        if count > 1 and last[1] > first[1] and last[0] > first[0]:
            pace = (last[1] - first[1]) / (last[0] - first[0])  # seconds per step
            out["eta_s"] = max(0.0, (total - last[0]) * pace)
    return out


def job_series(server: Server, job_id: str, after: int) -> dict[str, Any]:
    """The metrics of the steps after `after`, one list per chart, and the job's state."""
    job = server.scheduler.get(job_id)
    summary = job_summary(server, job)
    rows = server.store.step_metrics(job_id, after)
    return {
        "status": job["status"],
        "total_steps": summary["total_steps"],
        "progress": summary["progress"],
        "steps": [r["step"] for r in rows],
        "loss": [r.get("train_loss") for r in rows],
        "lr": [r.get("learning_rate") for r in rows],
        "grad_norm": [r.get("grad_norm") for r in rows],
        "grad_norm_clipped": [r.get("grad_norm_clipped") for r in rows],
        "m_dev": [
            abs(r["spectral_norm_max"] - 1) if "spectral_norm_max" in r else None for r in rows
        ],
    }


# -- forgetting ---------------------------------------------------------------------------------------
def run_of(stack: Path) -> tuple[Path, Path] | None:
    """(unit, run dir) when `stack` is `RUN/<method>/seed-<s>/stack` of a `crma run`."""
    unit = stack.resolve().parent
    if (unit / "loss_matrix.json").is_file():
        return unit, unit.parent.parent
    return None


def forgetting_view(server: Server) -> dict[str, Any]:
    """The loss matrix and drift where `crma run` built the stack; QA accuracy where it was
    evaluated (`crma eval`, or the run's eval.qa)."""
    found = run_of(server.stack)
    qa = [server.stack / "eval" / "qa.json", *([found[0] / "qa.json"] if found else [])]
    qa_file = next((p for p in qa if p.is_file()), None)
    return {
        "matrix": loss_matrix_view(*found) if found else None,
        "qa": qa_view(json.loads(qa_file.read_text())) if qa_file else None,
    }


def loss_matrix_view(unit: Path, run_dir: Path) -> dict[str, Any]:
    """This stack's loss matrix and per-domain drift, and the run report's figures."""
    data = json.loads((unit / "loss_matrix.json").read_text())
    domains, L = data["domains"], data["loss_matrix"]
    complete = len(L) == len(domains) + 1 and None not in L[-1]
    drift = drift_per_domain(L, domains) if complete and len(domains) > 1 else {}
    cells = [v for row in L for v in row if v is not None]
    report = run_dir / "report.json"
    summary = None
    if report.is_file():
        summary = json.loads(report.read_text())["methods"].get(unit.parent.name)
    return {
        "run": run_dir.name,
        "method": data.get("method"),
        "seed": data.get("seed"),
        "domains": domains,
        "rows": ["before training", *(f"after {d}" for d in domains[: len(L) - 1])],
        "matrix": L,
        "low": min(cells, default=0.0),
        "high": max(cells, default=1.0),
        "drift": drift,
        "drift_mean": sum(drift.values()) / len(drift) if drift else None,
        "method_summary": summary,
        "plots": [p for p in REPORT_PLOTS if (run_dir / "plots" / p).is_file()],
    }


def qa_view(result: dict[str, Any]) -> dict[str, Any]:
    """QA accuracy per condition (rows) and domain × item kind (columns), as `crma eval`'s
    qa.md tabulates it."""
    oracle = result["results"]["oracle"]
    columns = [(d, k) for d in result["domains"] for k in oracle.get(d, {})]
    rows = [
        (c, [result["results"][c].get(d, {}).get(k) for d, k in columns])
        for c in result["conditions"]
    ]
    return {"method": result.get("method"), "columns": columns, "rows": rows}


def report_plot(server: Server, name: str) -> Path | None:
    """A figure of the run report (only the names the view shows)."""
    found = run_of(server.stack)
    if found is None or name not in REPORT_PLOTS:
        return None
    path = found[1] / "plots" / name
    return path if path.is_file() else None
