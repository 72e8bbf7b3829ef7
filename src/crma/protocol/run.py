"""The run loop: per (method, seed), train domain after domain and fill the loss matrix."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml

from crma.continual import ContinualModel
from crma.distributed import make_accelerator, refuse_unsupported
from crma.errors import UserError
from crma.eval.hook import protocol_evals
from crma.eval.loss import mean_token_loss
from crma.fileio import atomic_path, is_temporary, write_json, write_text
from crma.lock import LOCK_FILE, WriterLock
from crma.methods import METHODS
from crma.model import base_model_id, load_base
from crma.protocol.config import MethodSpec, RunConfig, load_config, method_settings, resolved
from crma.protocol.data import DomainData, load_domains
from crma.protocol.store import finished, missing_evals, reusable_unit
from crma.provenance import data_identity, recorded_data
from crma.quantize import quantization_config
from crma.train import mixed_precision


class ProtocolRun:
    def __init__(
        self,
        config: RunConfig,
        out: str | Path,
        model_loader=None,
        reuse: list[str | Path] = (),
    ):
        self.config, self.out = config, Path(out)
        self.reuse = [Path(r) for r in reuse]
        self._caches_merged: set[Path] = set()  # reuse runs whose eval cache is merged already
        self.model_loader = model_loader or (lambda: load_base(config.base, load_in=config.load_in))
        self.cache_path = self.out / "eval_cache.json"
        self.data: dict[str, Any] = {}  # what the results are computed on, once it is read

    def run(self) -> dict[str, Any]:
        quantization_config(self.config.load_in, self.config.base)  # before any work
        acc = make_accelerator(mixed_precision(self.config.train.precision))
        for spec in self.config.methods:
            train = method_settings(self.config, spec)[1]
            method = METHODS[spec.name]
            refuse_unsupported(
                method, acc, train.fsdp, train.deepspeed, train.gradient_checkpointing
            )
        self._refuse_other_config()
        with WriterLock(self.out) if acc.is_main_process else nullcontext():
            return self._run(acc)

    def _run(self, acc) -> dict[str, Any]:
        from crma.report.build import build_report

        base_id = base_model_id(self.config.base)
        model, tokenizer = self.model_loader()
        for spec in self.config.methods:  # settings the model cannot take fail before any write
            method_settings(self.config, spec)[0].check_model(model)
        domains = load_domains(self.config, tokenizer)
        self.data = data_identity(self.config.domains)  # the files exist: load_domains read them
        self._write_config(acc)
        cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        units = [(spec, seed) for seed in self.config.seeds for spec in self.config.methods]
        clock = _Clock(total=len(units) * len(domains))
        for spec, seed in units:
            if acc.is_main_process:
                self._reuse(spec, seed, len(domains), cache)
            acc.wait_for_everyone()
            if not acc.is_main_process and self.cache_path.is_file():
                # the main process's cache: every process must skip the same evaluations
                cache.update(json.loads(self.cache_path.read_text()))
            self._run_one(spec, seed, domains, base_id, acc, cache, clock)
        report = None
        if acc.is_main_process:
            report = build_report(self.out)
        acc.wait_for_everyone()
        return report

    def _reuse(self, spec: MethodSpec, seed: int, n_domains: int, cache: dict[str, Any]) -> None:
        """Copy a finished (method, seed) from a `reuse` run whose settings for it are identical,
        and that run's evaluation cache (keyed by weight fingerprints, valid under the same
        data and eval settings, which identical settings imply)."""
        target = self.out / spec.key / f"seed-{seed}"
        if target.exists():
            return
        found = reusable_unit(self.config, spec, seed, n_domains, self.data, self.reuse)
        if found is not None:
            source, other = found
            self._copy(source, target, other, cache)
            print(f"[{spec.key} seed {seed}] reused from {source} (same settings)", flush=True)

    def _copy(self, source: Path, target: Path, other: Path, cache: dict[str, Any]) -> None:
        with atomic_path(target) as tmp:
            shutil.copytree(source, tmp)
        if other not in self._caches_merged and (other / "eval_cache.json").is_file():
            theirs_cache = json.loads((other / "eval_cache.json").read_text())
            cache.update({k: v for k, v in theirs_cache.items() if k not in cache})
            write_json(self.cache_path, cache)
            self._caches_merged.add(other)

    def _check_exported(self, spec: MethodSpec, run_dir: Path) -> None:
        """A finished unit without its weights (`crma export`) must hold every configured eval."""
        if missing := missing_evals(self.config, spec, run_dir):
            raise UserError(
                f"{run_dir}: finished without its weights (stack/) and lacks {', '.join(missing)}; "
                "evaluating those needs the weights: reuse the full run, or delete this folder to retrain"
            )

    def _refuse_other_config(self) -> None:
        """The run directory must be this run's (same config), or new: nothing else in it."""
        path = self.out / "config.yaml"
        # Parsed, so a setting added since that run was made reads as its default there.
        if path.is_file() and resolved(load_config(path)) != resolved(self.config):
            raise UserError(
                f"{path}: this run directory holds a different config; use another --out or the same config"
            )
        other = (
            [p.name for p in self.out.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name)]
            if self.out.is_dir() and not path.is_file()
            else []
        )
        if other:
            raise UserError(
                f"{self.out}: exists and is not a crma run directory (no config.yaml, holds "
                f"{sorted(other)[0]!r}); use a new or empty --out"
            )

    def _write_config(self, acc) -> None:
        if acc.is_main_process:
            write_text(
                self.out / "config.yaml", yaml.safe_dump(resolved(self.config), sort_keys=False)
            )
        acc.wait_for_everyone()

    def _run_one(
        self, spec: MethodSpec, seed: int, domains: list[DomainData], base_id, acc, cache, clock
    ) -> None:
        run_dir = self.out / spec.key / f"seed-{seed}"
        if not (run_dir / "stack").exists() and finished(run_dir, len(domains)):
            self._check_exported(spec, run_dir)  # results without weights: reported as they are
            for _ in domains:
                clock.skip()
            return
        stack_spec, train_cfg = method_settings(self.config, spec)
        cm = ContinualModel.open_or_create(
            run_dir / "stack", self.model_loader, base_id, stack_spec
        )
        cm.tidy(acc)
        names = [d.name for d in domains]
        matrix_path = run_dir / "loss_matrix.json"
        saved = json.loads(matrix_path.read_text()) if matrix_path.is_file() else {}
        rows = saved.get("loss_matrix", [])
        # wall seconds to train each domain in this run, commit included; None: trained by an
        # earlier process that was killed before evaluating it
        seconds = saved.get("train_seconds") or [None] * len(domains)
        data = recorded_data(run_dir, not self.config.domains) if rows else None
        if data not in (self.data, None):
            raise UserError(
                f"{matrix_path}: computed on other data ({json.dumps(data)}, now "
                f"{json.dumps(self.data)}); use another --out"
            )
        run_info = {"method": spec.key, "seed": seed}

        def evaluate_row(trained: int) -> list[float | None]:
            """Row `trained` of the loss matrix; row 0 (the base) is always complete."""
            row = []
            for i, d in enumerate(domains):
                if 0 < trained <= i and not self.config.eval.future_domains:
                    row.append(None)
                    continue
                adapters = cm.method.eval_adapters(d.name)
                key = f"{d.name}:{cm.engine.fingerprint(adapters)}"
                if key not in cache:
                    cache[key] = mean_token_loss(
                        cm.engine, d.holdout, adapters, self.config.eval.batch_size, acc
                    )
                    if acc.is_main_process:
                        write_json(self.cache_path, cache)
                row.append(cache[key])
            return row

        def save_rows() -> None:
            if acc.is_main_process:
                write_json(
                    matrix_path,
                    {
                        "domains": names,
                        "seed": seed,
                        "method": spec.key,
                        "data": self.data,
                        "loss_matrix": rows,
                        "train_seconds": seconds,
                    },
                )

        if not rows:
            rows.append(evaluate_row(0))
            save_rows()
        for k, d in enumerate(domains):
            if len(rows) >= k + 2:
                clock.skip()
                continue
            start = time.perf_counter()
            tag = f"[{spec.key} seed {seed}] {k + 1}/{len(domains)} {d.name}"
            fresh = d.name not in cm.stack.domains
            if fresh:
                cm.add_domain(
                    d.name,
                    d.train,
                    train_cfg,
                    acc,
                    seed,
                    run_dir / "metrics.jsonl",
                    run_info,
                    d.info,
                    progress=tag,
                    route_examples=d.route,
                )
            trained = time.perf_counter()
            seconds[k] = round(trained - start, 1) if fresh else None
            rows.append(evaluate_row(k + 1))
            save_rows()
            clock.done(time.perf_counter() - start)
            if acc.is_main_process:
                steps = cm.stack.domain_entry(d.name).get("steps", 0)
                print(
                    f"{tag}: {steps} steps in {trained - start:.0f} s, eval {time.perf_counter() - trained:.0f} s, "
                    f"holdout loss {rows[-1][k]:.3f} | run {clock.progress()}",
                    flush=True,
                )
        if self.config.eval.routing or self.config.eval.qa:
            tag = f"[{spec.key} seed {seed}]"
            protocol_evals(
                cm, domains, run_dir, self.config.eval, rows, cache, self.cache_path, acc, tag
            )


class _Clock:
    """Progress and ETA over all (method, seed, domain) stages, counting only stages run now."""

    def __init__(self, total: int):
        self.total, self.finished, self.run_count, self.seconds = total, 0, 0, 0.0

    def skip(self) -> None:
        self.finished += 1

    def done(self, seconds: float) -> None:
        self.finished += 1
        self.run_count += 1
        self.seconds += seconds

    def progress(self) -> str:
        left = self.total - self.finished
        eta = self.seconds / max(1, self.run_count) * left
        return f"{self.finished}/{self.total} stages, ETA {_fmt(eta)}"


def _fmt(seconds: float) -> str:
    minutes = int(seconds // 60)
    return (
        f"{minutes // 60}h{minutes % 60:02d}m"
        if minutes >= 60
        else f"{minutes}m{int(seconds % 60):02d}s"
    )
