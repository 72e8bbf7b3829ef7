"""The fine-tuning worker: `python -m crma.serve.worker SPEC.json` trains one job's domain.

It adds the domain exactly as `crma train` does (`crma.cli.train.train_domain`, through
ContinualModel, so the stack's own commit rules apply), and resumes from the stack's checkpoint
when the job ran before. It writes `result.json` beside its spec and exits 0 on success.
It dies with the server: a server killed with SIGKILL must not leave a second writer behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from crma.errors import UserError
from crma.fileio import write_json

LOCK = "worker.lock"


def main(argv: list[str]) -> int:
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    _die_with_parent()
    os.nice(spec.get("nice", 0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cancel: atomic writes clean up
    with open(Path(spec["serve_dir"]) / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a worker of a killed server may still be exiting
        try:
            result = {"ok": True, **run_job(spec)}
        except UserError as exc:
            result = {"ok": False, "error": str(exc)}
        except Exception as exc:
            traceback.print_exc()
            result = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    write_json(spec_path.with_name("result.json"), result)
    return 0 if result["ok"] else 1


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the job's domain into the stack (or find it there, committed by an earlier run)."""
    from crma.cli.train import train_domain
    from crma.continual import ContinualModel
    from crma.data import load_records
    from crma.distributed import make_accelerator
    from crma.model import base_model_id, load_base
    from crma.settings import from_dict
    from crma.stack import Stack
    from crma.train import TrainConfig, mixed_precision

    stack, domain = spec["stack"], spec["domain"]
    committed = _committed(Stack.open(stack), domain, spec["job"])
    if committed is not None:
        return committed
    base = spec["base"] or Stack.open(stack).manifest["base_model"]["name"]
    cm = ContinualModel.open_or_create(stack, lambda: load_base(base), base_model_id(base))
    cfg = from_dict(TrainConfig, spec["train"], "job hyperparameters")
    path = Path(spec["file"])
    acc = make_accelerator(mixed_precision(cfg.precision))
    cm.tidy(acc)
    route = spec.get("route_file")
    result = train_domain(
        cm,
        domain,
        path,
        load_records(path),
        cfg,
        acc,
        spec["seed"],
        info={"job": spec["job"]},
        route_records=load_records(Path(route)) if route else [],
    )
    return _summary(result)


def _committed(stack, domain: str, job: str) -> dict[str, Any] | None:
    if domain not in stack.domains:
        return None
    entry = stack.domain_entry(domain)
    if entry.get("job") != job:
        raise UserError(f"the stack already has a domain {domain!r}")
    return _summary(entry)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("steps", "final_train_loss", "examples")}


def _die_with_parent() -> None:
    """Exit as soon as the server that started this worker is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
