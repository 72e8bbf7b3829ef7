"""POST /v1/chat/completions and /v1/completions: requests into the batcher, answers whole or
streamed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from crma.serve.batcher import Request
from crma.serve.errors import APIError
from crma.serve.sampling import Sampling
from crma.serve.schemas import ChatRequest, CompletionRequest
from crma.serve.store import new_id

if TYPE_CHECKING:
    from crma.serve.server import Server

DONE = "data: [DONE]\n\n"


def add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        return await _generate(
            server, "chat", body, body.conversation(), body.route_text(), body.limit
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = str(body.prompt)
        return await _generate(server, "completions", body, prompt, prompt, body.max_tokens)


async def _generate(server: Server, kind: str, body, prompt, route_text: str, max_tokens):
    snap, s = server.snapshot(), server.settings
    if body.model not in snap.names:
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; this stack serves {', '.join(snap.names)}",
            "model",
            "model_not_found",
        )
    if max_tokens is not None and max_tokens > s.max_tokens:
        raise APIError(400, f"max_tokens: at most {s.max_tokens}", "max_tokens", "too_large")
    if body.n > s.max_n:
        raise APIError(400, f"n: at most {s.max_n}", "n", "too_large")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    start = time.monotonic()
    request = Request(
        prompt=prompt,
        route_text=route_text,
        model=body.model,
        chat=kind == "chat",
        sampling=Sampling(max_tokens, body.temperature, body.top_p, body.stops, body.seed),
        n=body.n,
        emit=lambda event: _deliver(loop, events, event),
        deadline=start + s.request_timeout,
    )
    server.batcher.submit(request)
    call = _Call(server, kind, body, request, events, start)
    try:
        await call.routed()
        if body.stream:
            return StreamingResponse(
                call.stream(), media_type="text/event-stream", headers=call.headers
            )
        return JSONResponse(await call.whole(), headers=call.headers)
    except BaseException:
        request.cancelled = True
        raise


def _deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, event: tuple) -> None:
    """Hand an event from the decode thread to the request's event loop (if it still runs)."""
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
        loop.call_soon_threadsafe(events.put_nowait, event)


class _Call:
    """One generation request's answer, whole or streamed as server-sent events."""

    def __init__(self, server: Server, kind: str, body, request: Request, events, start: float):
        self.server, self.kind, self.body, self.request = server, kind, body, request
        self.events, self.start = events, start
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    async def _next(self) -> tuple:
        event = await self.events.get()
        if event[0] == "error":
            raise event[1]
        return event

    async def routed(self) -> None:
        _, self.name, routed = await self._next()
        confidence = routed.confidence
        self.info = {
            "domain": self.name,
            "confidence": confidence,
            "requested": self.body.model,
            "scores": routed.scores,  # the router's probability per domain ('auto' only)
        }
        self.headers = {"x-crma-domain": self.name}
        if confidence is not None:
            self.headers["x-crma-confidence"] = f"{confidence:.4f}"
            self.server.metrics.router_confidence.observe(confidence)

    async def whole(self) -> dict[str, Any]:
        texts: dict[int, str] = {}
        done: dict[int, tuple] = {}
        while len(done) < self.body.n:
            event = await self._next()
            if event[0] == "done":
                done[event[1]] = event
                texts[event[1]] = event[4]
        choices = [self._choice(i, texts[i], done[i][2]) for i in range(self.body.n)]
        tokens = sum(e[3] for e in done.values())
        self._account(tokens)
        return {**self._head(self.object), "choices": choices, "usage": self._usage(tokens)}

    async def stream(self) -> AsyncIterator[str]:
        tokens, finished, first = 0, 0, True
        chunk = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        try:
            if self.kind == "chat":
                for i in range(self.body.n):
                    yield _sse({**self._head(chunk), "choices": [self._delta(i, role=True)]})
            while finished < self.body.n:
                event = await self._next()
                if event[0] == "delta":
                    if first:
                        first = False
                        self.server.metrics.ttft.labels(self.kind).observe(
                            time.monotonic() - self.start
                        )
                    yield _sse({**self._head(chunk), "choices": [self._delta(event[1], event[2])]})
                elif event[0] == "done":
                    finished, tokens = finished + 1, tokens + event[3]
                    yield _sse(
                        {**self._head(chunk), "choices": [self._delta(event[1], end=event[2])]}
                    )
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield _sse({**self._head(chunk), "choices": [], "usage": self._usage(tokens)})
            self._account(tokens)
            yield DONE
        except APIError as exc:  # headers are sent: the error travels as an event
            yield _sse(exc.body())
            yield DONE
        finally:  # also when the client goes away: its rows leave the batch
            self.request.cancelled = True

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.name,
            "crma": self.info,
        }

    def _choice(self, index: int, text: str, reason: str) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

    def _delta(self, index: int, text: str = "", end: str | None = None, role: bool = False):
        if self.kind != "chat":
            return {"index": index, "text": text, "finish_reason": end, "logprobs": None}
        delta = (
            {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        )
        return {"index": index, "delta": delta, "finish_reason": end, "logprobs": None}

    def _usage(self, completion: int) -> dict[str, int]:
        prompt = self.request.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _account(self, completion: int) -> None:
        m, model = self.server.metrics, self.body.model
        m.requests.labels(self.kind, model, self.name, "200").inc()
        m.prompt_tokens.labels(model, self.name).inc(self.request.prompt_tokens)
        m.completion_tokens.labels(model, self.name).inc(completion)
        m.latency.labels(self.kind).observe(time.monotonic() - self.start)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
