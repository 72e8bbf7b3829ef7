"""Continuous batching across domains: one thread owns the model and decodes every active row.

Between decode steps the thread admits waiting requests: it routes the `auto` ones together,
prefills them together (prefill.py: one forward per group of similar length, each row through
its own adapter, the chat template's head from a cache) into a DynamicCache, and merges that
cache into the batch's by left padding. Every step then feeds all rows one token, each row
through its own domain's adapter (PEFT `adapter_names`), with the attention mask hiding the
padding and `position_ids` counting each row's own tokens, so a row computes what it would
alone. Rows leave on end-of-text, a stop string, `max_tokens` or the context's end.

A new snapshot of the stack (after a fine-tuning job commits) is loaded beside the serving one;
the thread then stops admitting, lets the rows in flight finish on the old snapshot, swaps,
and admits again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from crma.batching import select_rows
from crma.generate import AUTO, SHARED
from crma.serve.config import ServeSettings
from crma.serve.errors import APIError
from crma.serve.kv import merge
from crma.serve.prefill import Adapters, groups, prefill
from crma.serve.sampling import Sampling, generator, holdback, sample
from crma.serve.snapshot import BASE_MODEL, Routed, Snapshot

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One API request: its prompt, what answers it, and where its events go.

    Events, in order: ("routed", model, Routed), then per choice ("delta", index,
    text) and ("done", index, finish_reason, completion_tokens, text); or ("error", APIError).
    """

    prompt: str | list[dict[str, str]]
    route_text: str
    model: str  # 'auto', 'base' or a domain
    chat: bool
    sampling: Sampling
    n: int
    emit: Callable[[tuple], None]
    deadline: float
    cancelled: bool = False
    prompt_tokens: int = 0


@dataclass
class Row:
    """One choice of a request being decoded."""

    request: Request
    index: int
    adapters: str | list[str] | None
    max_tokens: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted


class Batcher:
    """The decode loop (a daemon thread) and its waiting queue."""

    def __init__(self, settings: ServeSettings, metrics=None):
        self.settings, self.metrics = settings, metrics
        self.snapshot: Snapshot | None = None
        self._pending: tuple[Snapshot, threading.Event] | None = None
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T): 1 real token, 0 left padding
        self._thread = threading.Thread(target=self._run, name="crma-decode", daemon=True)
        self._thread.start()

    # -- called from other threads ---------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.settings.max_queue:
                raise APIError(429, "the queue is full; retry later", code="queue_full")
            self._waiting.append(request)
            self._gauge()
            self._cond.notify()

    def swap(self, snapshot: Snapshot) -> threading.Event:
        """Serve `snapshot` once the rows in flight finish; the event is set when it serves."""
        done = threading.Event()
        with self._cond:
            if self.snapshot is None:
                self.snapshot = snapshot
                done.set()
            else:
                self._pending = (snapshot, done)
            self._cond.notify()
        return done

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not (self._stop or self.rows or self._waiting or self._pending):
                        self._cond.wait()
                    if self._stop:
                        return
                    self._swap_if_idle()
                    admitted = self._take()
                try:
                    self._expire()
                    if admitted:
                        self._admit(admitted)
                    if self.rows:
                        self._step()
                    elif self._pending is None and not admitted and self._waiting:
                        time.sleep(0.001)  # requests wait on a swap: do not spin
                except Exception as exc:  # the loop must outlive any one batch
                    log.exception("decode loop")
                    self._fail_all(exc)

    def _swap_if_idle(self) -> None:
        if self._pending is not None and not self.rows:
            self.snapshot, done = self._pending
            self._pending = None
            done.set()
            log.info("serving the new stack snapshot: %s", ", ".join(self.snapshot.domains))

    def _take(self) -> list[Request]:
        """Requests to admit now: none while a swap waits, one at a time if rows cannot mix."""
        snap = self.snapshot
        if self._pending is not None or snap is None:
            return []
        free = self.settings.max_batch - len(self.rows) if snap.batchable else int(not self.rows)
        taken: list[Request] = []
        while self._waiting and free > 0:
            request = self._waiting.popleft()
            free -= request.n
            taken.append(request)
        self._gauge()
        return taken

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))

    def _expire(self) -> None:
        """Drop cancelled requests and answer those past their deadline."""
        now = time.monotonic()
        with self._cond:
            for request in list(self._waiting):
                if request.cancelled or now > request.deadline:
                    self._waiting.remove(request)
                    _timeout(request, now)
        gone = [
            i for i, r in enumerate(self.rows) if r.request.cancelled or now > r.request.deadline
        ]
        for i in gone:
            _timeout(self.rows[i].request, now)
        self._retire(gone)

    # -- admission: route, prefill, merge -----------------------------------------------------
    def _admit(self, requests: list[Request]) -> None:
        snap = self.snapshot
        assert snap is not None
        try:
            routes = self._route(snap, requests)
        except Exception as exc:  # a routing failure fails these requests, not the server
            log.exception("routing failed")
            for request in requests:
                request.emit(("error", APIError(500, f"routing failed: {exc}")))
            return
        ready: list[tuple[Request, list[int], Adapters]] = []
        for request, routed in zip(requests, routes):
            try:
                ready.append(self._prepare(snap, request, routed))
            except APIError as exc:
                request.emit(("error", exc))
            except Exception as exc:
                log.exception("prefill failed")
                request.emit(("error", APIError(500, f"prefill failed: {exc}")))
        lengths = [len(ids) for _, ids, _ in ready]
        for group in groups(lengths, lambda i: snap.head.length(ready[i][1])):
            members = [ready[i] for i in group]
            try:
                self._prefill(snap, members)
            except Exception as exc:
                log.exception("prefill failed")
                for request, _, _ in members:
                    request.emit(("error", APIError(500, f"prefill failed: {exc}")))

    @staticmethod
    def _route(snap: Snapshot, requests: list[Request]) -> list[Routed]:
        routes = [Routed(None if r.model == BASE_MODEL else r.model) for r in requests]
        auto = [i for i, r in enumerate(requests) if r.model == AUTO]
        if auto:
            chosen = snap.route([requests[i].route_text for i in auto])
            for i, route in zip(auto, chosen):
                routes[i] = route
        return routes

    @staticmethod
    def _prepare(
        snap: Snapshot, request: Request, routed: Routed
    ) -> tuple[Request, list[int], Adapters]:
        """Check that the prompt fits and announce the route: the prompt's ids and adapters."""
        ids = snap.model.encode(request.prompt, request.chat)
        room = snap.max_context - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {snap.max_context}",
                "messages" if request.chat else "prompt",
                "context_length_exceeded",
            )
        wanted = request.sampling.max_tokens
        if wanted is not None and wanted > room:
            raise APIError(
                400,
                f"max_tokens {wanted} + the prompt's {len(ids)} tokens exceed this model's "
                f"context of {snap.max_context}",
                "max_tokens",
                "context_length_exceeded",
            )
        request.prompt_tokens = len(ids)
        domain = routed.domain
        adapters = snap.adapters(snap.domains[-1] if domain == SHARED else domain)
        request.emit(("routed", _model_name(domain), routed))
        return request, ids, adapters

    def _prefill(self, snap: Snapshot, members: list[tuple[Request, list[int], Adapters]]):
        """Prefill requests together (one forward); each of their choices becomes a row."""
        prompts, adapters = [ids for _, ids, _ in members], [a for _, _, a in members]
        cache, mask, logits = prefill(snap, snap.head, prompts, adapters)
        rows: list[Row] = []
        index: list[int] = []  # each row's prompt: a request's n choices share one
        for k, (request, ids, chosen) in enumerate(members):
            room = snap.max_context - len(ids)
            limit = min(request.sampling.max_tokens or room, room)
            rows += [
                Row(request, i, chosen, limit, generator(request.sampling, i))
                for i in range(request.n)
            ]
            index += [k] * request.n
        if index != list(range(len(members))):
            select_rows(cache, index)
        self._join(snap, rows, cache, mask[index], logits[index])

    def _join(self, snap, rows: list[Row], cache, mask, logits) -> None:
        """Rows whose first token is not already their last join the batch."""
        finished = self._advance(snap, rows, logits, positions=mask.sum(1))
        keep = [i for i in range(len(rows)) if i not in finished]
        if not keep:
            return
        if len(keep) < len(rows):
            select_rows(cache, keep)
            mask, rows = mask[keep], [rows[i] for i in keep]
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            self._cache, self._mask = merge(self._cache, self._mask, cache, mask)
        self.rows += rows

    # -- one decode step for every row ------------------------------------------------------------
    def _step(self) -> None:
        snap = self.snapshot
        assert snap is not None and self._cache is not None and self._mask is not None
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.rows))
        positions = self._mask.sum(1)  # each row's own token count: its next position
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows])
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        try:
            logits = snap.logits(
                ids,
                mask,
                positions.unsqueeze(1),
                self._cache,
                [r.adapters for r in self.rows],
            )
        except Exception as exc:
            log.exception("decode step failed")
            self._fail_all(exc)
            return
        self._mask = mask
        self._retire(sorted(self._advance(snap, self.rows, logits, positions + 1)))

    def _fail_all(self, exc: Exception) -> None:
        for request in {id(r.request): r.request for r in self.rows}.values():
            request.emit(("error", APIError(500, f"decoding failed: {exc}")))
        self.rows, self._cache, self._mask = [], None, None

    def _advance(self, snap: Snapshot, rows: list[Row], logits, positions) -> set[int]:
        """Pick each row's next token and emit its text; the indices of rows that finished."""
        chosen = sample(logits[:, : snap.vocab], [(r.request.sampling, r.generator) for r in rows])
        finished = set()
        for i, (row, token) in enumerate(zip(rows, chosen)):
            reason = self._extend(snap, row, token, int(positions[i]))
            if reason:
                finished.add(i)
                self._finish(row, reason)
        return finished

    def _extend(self, snap: Snapshot, row: Row, token: int, position: int) -> str | None:
        """Add `token` to the row; its finish reason if it is done."""
        if token in snap.eos:
            return "stop"
        row.tokens.append(token)
        text = snap.model.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stop = row.request.sampling.stop
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text = text[:cut]
            return "stop"
        row.text = text
        safe = len(text) - holdback(text, stop)
        if safe > row.sent:
            row.request.emit(("delta", row.index, text[row.sent : safe]))
            row.sent = safe
        if len(row.tokens) >= row.max_tokens or position + 1 >= snap.max_context:
            return "length"
        return None

    @staticmethod
    def _finish(row: Row, reason: str) -> None:
        if row.sent < len(row.text):
            row.request.emit(("delta", row.index, row.text[row.sent :]))
            row.sent = len(row.text)
        row.request.emit(("done", row.index, reason, len(row.tokens), row.text))

    def _retire(self, indices: list[int]) -> None:
        """Remove rows from the batch and its cache; trim padding no row needs any more."""
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        assert self._cache is not None and self._mask is not None
        select_rows(self._cache, keep)
        mask = self._mask[keep]
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())
        if lead:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            mask = mask[:, lead:]
        self._mask = mask


# -- helpers ----------------------------------------------------------------------------------
def _model_name(domain: str | None) -> str:
    return BASE_MODEL if domain is None else AUTO if domain == SHARED else domain


def _timeout(request: Request, now: float) -> None:
    if not request.cancelled:
        request.emit(
            ("error", APIError(504, "the request ran past its time limit", code="timeout"))
        )
    request.cancelled = True
