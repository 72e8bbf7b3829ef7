"""Online continual learning on an unlabelled stream (`crma stream`).

The detector (crma.stream.detector) decides every document's domain. A new domain's adapter is
trained, with the stack's method, once the domain holds `min_segment` decided documents (on
those documents), and the commit adds it to the router; documents of known domains are routed
to them (and, with `refresh`, retrain those domains at the end of the stream). A new domain that
never reaches `min_segment` documents gets no adapter.

Everything is logged, append-only, in the stack's `stream.jsonl`: a `start` event (input,
settings, the domains known at the start), then `decision`, `segment`, `trained`, `untrained`,
`refreshed` and `done` events. Appends hold the stack's writer lock (crma.lock). A run killed
anywhere (even by SIGKILL) resumes when rerun: the detector replays the input from the start
(the embeddings are computed in fixed chunks, so bit for bit the same), each replayed decision
is checked against the logged one, and logging and training go on from where they stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crma.continual import ContinualModel
from crma.data.formats import record_text
from crma.errors import UserError
from crma.lock import WriterLock
from crma.model import file_sha256
from crma.settings import Settings, from_dict, setting
from crma.stack import STREAM_LOG
from crma.stream.detector import Decision, Detector, DetectorSettings, Oracle
from crma.stream.segment import chunk_embeddings, known_domains
from crma.train import TrainConfig


@dataclass
class StreamSettings(Settings):
    """How `crma stream` grows a stack from a stream."""

    min_segment: int = setting(
        30, "documents a new domain collects before its adapter is trained on them", ge=1
    )


class StreamLog:
    """The append-only event log. A torn last line (a kill mid-append) is dropped when read and
    cut off before the next append."""

    def __init__(self, stack_path: Path):
        self.stack_path = stack_path
        self.path = stack_path / STREAM_LOG
        self.size = 0  # bytes of whole lines, as this process last saw or wrote them

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        whole = raw[: raw.rfind(b"\n") + 1]
        events = []
        for lineno, line in enumerate(whole.splitlines(), 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{self.path}:{lineno}: not a JSON event ({exc.msg}); the log was edited, "
                    "move it away to start the stream again"
                ) from exc
            if event.get("event") == "start":
                event = _with_defaults(event, f"{self.path}:{lineno}: start event")
            events.append(event)
        self.size = len(whole)
        return events

    def append(self, events: list[dict[str, Any]]) -> None:
        """Write `events` under the stack's writer lock, refusing if another process wrote."""
        if not events:
            return
        with WriterLock(self.stack_path):
            self.path.touch()
            current = self.path.stat().st_size
            if current < self.size:
                raise UserError(f"{self.path}: shrank while this stream ran; run it again")
            with open(self.path, "r+b") as fh:
                fh.seek(self.size)
                if fh.read(current - self.size).count(b"\n"):
                    raise UserError(
                        f"{self.path}: another process appended to it; one stream per stack"
                    )
                fh.seek(self.size)
                fh.truncate()  # a torn line of a killed run
                fh.write(b"".join(json.dumps(e).encode() + b"\n" for e in events))
                fh.flush()
                os.fsync(fh.fileno())
                self.size = fh.tell()


# Settings that changed decisions when they arrived: a log without one was made without it.
_BEFORE = {"detector": {"known_band": 0.0}}


def _with_defaults(start: dict[str, Any], where: str) -> dict[str, Any]:
    """A start event with the settings crma gained since it was logged read as their
    defaults (or, for one that changes decisions, as what the log was made with), so an
    upgrade alone does not stop a stream from resuming."""
    kinds = {"settings": StreamSettings, "detector": DetectorSettings, "train": TrainConfig}
    return start | {
        key: dataclasses.asdict(
            from_dict(cls, _BEFORE.get(key, {}) | start[key], f"{where}: {key}")
        )
        for key, cls in kinds.items()
        if isinstance(start.get(key), dict)
    }


def _differences(logged: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key.setting: logged X, now Y` for each setting of `now` the logged start differs in."""
    out = []
    for key, value in now.items():
        if key == "input":
            continue
        old = logged.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += [
                f"{key}.{k}: logged {old.get(k)!r}, now {v!r}"
                for k, v in value.items()
                if old.get(k) != v
            ]
        elif old != value:
            out.append(f"{key}: logged {old!r}, now {value!r}")
    return out


class StreamLearner:
    """`StreamLearner(cm, ...).run(records)`: what `crma stream` does, as a Python API."""

    def __init__(
        self,
        cm: ContinualModel,
        input_path: Path,
        settings: StreamSettings,
        detector: DetectorSettings,
        train: TrainConfig,
        accelerator,
        seed: int = 0,
        names: list[str] | None = None,
        refresh: bool = False,
        truth: list[dict[str, Any]] | None = None,
    ):
        """`names`: of the new domains, in order found; `refresh`: at the end, retrain each
        domain known at the start that recurred with `min_segment` documents, on them
        (replacing its adapter); `truth`: the true segments `[{start, end, domain}]`, followed
        instead of detecting (the oracle a detector-driven run is compared with)."""
        self.cm, self.input_path, self.settings = cm, Path(input_path), settings
        self.detector_settings, self.train_cfg, self.acc = detector, train, accelerator
        self.seed, self.names, self.refresh = seed, list(names or []), refresh
        self.truth = truth
        self.log = StreamLog(cm.stack.path)
        self.log.read()  # a damaged log, or one from a newer crma, fails before any write

    # -- the run ------------------------------------------------------------------------------
    def run(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Process the whole stream (resuming a run this input started); a summary."""
        start = time.monotonic()
        header, logged = self._begin(len(records))
        if logged and logged[-1]["event"] == "done":
            return logged[-1]
        known, embedding = known_domains(self.cm.stack, header["known"])
        detector = (
            Oracle(self.truth, header["known"])
            if self.truth is not None
            else Detector(self.detector_settings, known, header["names"])
        )
        replay = _Replay(logged)
        docs: dict[str, list[int]] = {}  # domain -> decided document indices
        texts = [record_text(r) for r in records]
        for _, chunk in chunk_embeddings(self.cm.engine, texts, embedding):
            events = []
            for x in chunk:
                events += self._step(detector, detector.push(x), docs, replay)
            self.log.append(events)
            self._train_ready(detector, docs, records, replay)
        self.log.append(self._step(detector, detector.finish(), docs, replay))
        self._train_ready(detector, docs, records, replay, final=True)
        if self.refresh:
            self._refresh(header["known"], docs, records, replay)
        done = {
            "event": "done",
            "documents": detector.seen,
            "segments": detector.segments_dicts(),
            "trained": replay.trained,
            "seconds": round(time.monotonic() - start, 3),
        }
        self.log.append([done])
        return done

    def _begin(self, n_docs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The run's start event and what it logged so far: a new run, or the one to resume."""
        events = self.log.read()
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        header = {
            "event": "start",
            "input": str(self.input_path),
            "sha256": file_sha256(self.input_path),
            "documents": n_docs,
            "settings": dataclasses.asdict(self.settings),
            "detector": None if self.truth else dataclasses.asdict(self.detector_settings),
            "train": dataclasses.asdict(self.train_cfg),
            "seed": self.seed,
            "refresh": self.refresh,
            "truth": self.truth,
        }
        if starts:
            last = events[starts[-1]]
            run = events[starts[-1] + 1 :]
            same = {k: last.get(k) for k in header if k != "input"} == {
                k: v for k, v in header.items() if k != "input"
            }
            if same and last.get("names") == self.names:
                return last, run
            if not run or run[-1]["event"] != "done":
                what = (
                    "another input"
                    if last.get("sha256") != header["sha256"]
                    else "; ".join(_differences(last, header)[:3]) or "other new-domain names"
                )
                raise UserError(
                    f"{self.log.path}: the stream of {last['input']} ({what}) is unfinished; "
                    "rerun that command to finish it"
                )
        header |= {"known": list(self.cm.stack.domains), "names": self.names}
        self.log.append([header])
        return header, []

    def _step(
        self,
        detector: Detector,
        decisions: list[Decision],
        docs: dict[str, list[int]],
        replay: _Replay,
    ) -> list[dict[str, Any]]:
        """Events of new decisions and segments (checked against the log while replaying)."""
        events = []
        for segment in detector.segments[replay.segments_seen :]:
            events.append({"event": "segment", **segment.to_dict()} | {"end": None})
        replay.segments_seen = len(detector.segments)
        for d in decisions:
            docs.setdefault(d.domain, []).append(d.index)
            events.append({"event": "decision", **d.to_dict()})
        return replay.new_events(events, self.log.path)

    def _train_ready(self, detector, docs, records, replay, final: bool = False) -> None:
        """Train each new domain that has collected `min_segment` documents (at the end of the
        stream, log those that never did)."""
        need = self.settings.min_segment
        for segment in detector.segments:
            name = segment.domain
            if not segment.new or name in replay.trained or name in replay.untrained:
                continue
            have = docs.get(name, [])
            if len(have) >= need:
                self._train(name, have[:need], records, replay)
            elif final:
                replay.untrained.append(name)
                self.log.append([{"event": "untrained", "domain": name, "documents": len(have)}])

    def _train(self, name: str, indices: list[int], records, replay, replace: bool = False):
        from crma.cli.train import train_domain

        started = time.monotonic()
        if replace or name not in self.cm.stack.domains:  # else: committed, then killed
            train_domain(
                self.cm,
                name,
                self.input_path,
                [records[i] for i in indices],
                self.train_cfg,
                self.acc,
                self.seed,
                replace=replace,
                progress=name,
                info={"stream_documents": [indices[0], indices[-1]], "stream_count": len(indices)},
            )
        kind = "refreshed" if replace else "trained"
        event = {
            "event": kind,
            "domain": name,
            "documents": len(indices),
            "first": indices[0],
            "last": indices[-1],
            "seconds": round(time.monotonic() - started, 3),
        }
        (replay.refreshed if replace else replay.trained).append(name)
        self.log.append([event])

    def _refresh(self, known: list[str], docs, records, replay) -> None:
        for name in known:
            have = docs.get(name, [])
            if len(have) >= self.settings.min_segment and name not in replay.refreshed:
                self._train(name, have, records, replay, replace=True)


class _Replay:
    """What the run being resumed logged: checks replayed events against it, in order."""

    def __init__(self, logged: list[dict[str, Any]]):
        self.logged = [e for e in logged if e["event"] in ("decision", "segment")]
        self.position = 0
        self.segments_seen = 0
        self.trained = [e["domain"] for e in logged if e["event"] == "trained"]
        self.untrained = [e["domain"] for e in logged if e["event"] == "untrained"]
        self.refreshed = [e["domain"] for e in logged if e["event"] == "refreshed"]

    def new_events(self, events: list[dict[str, Any]], where: Path) -> list[dict[str, Any]]:
        """The events not logged yet; the others must equal what was logged."""
        fresh = []
        for event in events:
            if self.position < len(self.logged):
                if self.logged[self.position] != event:
                    raise UserError(
                        f"{where}: replaying the input gave {event} where the log has "
                        f"{self.logged[self.position]}; the input or model changed"
                    )
                self.position += 1
            else:
                fresh.append(event)
        return fresh
