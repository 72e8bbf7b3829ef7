"""The FastAPI app: OpenAI routes over one stack, its batcher, files and fine-tuning jobs."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from crma.generate import load_stack
from crma.routing.router import RouteSettings
from crma.serve.batcher import Batcher, Request, Sampling, Snapshot
from crma.serve.config import ServeSettings
from crma.serve.errors import APIError
from crma.serve.files import Files, file_object
from crma.serve.jobs import Scheduler, job_object
from crma.serve.metrics import Metrics
from crma.serve.schemas import ChatRequest, CompletionRequest, JobRequest
from crma.serve.store import Store, new_id
from crma.stack import Stack
from crma.train import TrainConfig

log = logging.getLogger(__name__)
SERVE_DIR = "serve"  # inside the stack: serve.sqlite, files/, jobs/<id>/
DONE = "data: [DONE]\n\n"


class Server:
    """Everything one `crma serve` process holds."""

    def __init__(
        self,
        stack: str | Path,
        settings: ServeSettings | None = None,
        api_key: str | None = None,
        base: str | None = None,
        route: RouteSettings | None = None,
        train: TrainConfig | None = None,
    ):
        self.stack = Path(stack)
        self.settings = settings or ServeSettings()
        self.api_key, self.base, self.route = api_key or None, base, route
        serve_dir = self.stack / SERVE_DIR
        self.metrics = Metrics()
        self.batcher = Batcher(self.settings, self.metrics)
        self.store = Store(serve_dir / "serve.sqlite")
        self.files = Files(serve_dir / "files", self.store)
        self.scheduler = Scheduler(
            self.stack,
            serve_dir,
            self.store,
            self.files,
            train or TrainConfig(),
            base,
            self.reload,
            self.settings.job_nice,
        )
        self.load_error: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._first_load, name="crma-load", daemon=True).start()

    def _first_load(self) -> None:
        try:
            self.batcher.swap(self.load())
        except Exception as exc:  # reported by /health; the process stays up to say so
            log.exception("cannot load %s", self.stack)
            self.load_error = str(exc)
            return
        self.scheduler.start()

    def load(self) -> Snapshot:
        snapshot = Snapshot(load_stack(self.stack, self.base, self.route), self.settings)
        snapshot.warm_up()
        return snapshot

    def reload(self) -> None:
        """Load the committed stack beside the served one and swap once in-flight rows finish."""
        self.batcher.swap(self.load()).wait()

    def close(self) -> None:
        self.scheduler.stop()
        self.batcher.close()

    def snapshot(self) -> Snapshot:
        snap = self.batcher.snapshot
        if snap is None:
            raise APIError(
                503, self.load_error or "the stack is loading; retry shortly", None, "loading"
            )
        return snap


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        await run_in_threadpool(server.close)

    app = FastAPI(title="crma serve", lifespan=lifespan, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)
    _errors(app, server)
    _health(app, server)
    _models(app, server)
    _generation(app, server)
    _files(app, server)
    _jobs(app, server)
    return app


# -- key and body size, before any route ----------------------------------------------------------
class Guard:
    """Bearer key on every /v1 path (constant-time compare) and body caps (413)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        key = server.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1") and self.expected is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await _send(send, APIError(401, "invalid API key", None, "invalid_api_key"))
        s = self.server.settings
        limit = s.max_file_bytes if scope["path"] == "/v1/files" else s.max_body_bytes
        too_big = APIError(413, f"the request body is over {limit} bytes", None, "too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await _send(send, APIError(400, "bad Content-Length header"))
        if int(declared) > limit:
            return await _send(send, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _send(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _send(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _errors(app: FastAPI, server: Server) -> None:
    def answer(request: HTTPRequest, error: APIError) -> JSONResponse:
        server.metrics.requests.labels(request.url.path, "", "", str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError):
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        if first.get("type") == "json_invalid":
            return answer(
                request, APIError(400, "the body is not valid JSON", None, "invalid_json")
            )
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return answer(
            request, APIError(400, f"{param or 'body'}: {message}", param, "invalid_value")
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, exc: HTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return answer(request, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def crashed(request: HTTPRequest, exc: Exception):
        log.exception("%s %s", request.method, request.url.path)
        return answer(request, APIError(500, f"internal error: {type(exc).__name__}"))


# -- health, metrics, models ------------------------------------------------------------------------
def _health(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    def health():
        snap = server.batcher.snapshot
        if snap is None:
            status = "error" if server.load_error else "loading"
            return JSONResponse({"status": status, "message": server.load_error}, 503)
        return {
            "status": "ok",
            "domains": snap.domains,
            "queue": server.batcher.queue_depth,
            "active_rows": len(server.batcher.rows),
            "jobs": server.store.count_jobs(),
        }

    @app.get("/metrics")
    def metrics():
        body = server.metrics.render(server.store.count_jobs())
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")


def _models(app: FastAPI, server: Server) -> None:
    def listing() -> list[dict[str, Any]]:
        snap = server.snapshot()
        manifest = snap.model.cm.stack.manifest
        created = _timestamp(manifest.get("created"))
        common = {"method": manifest["method"], "base_model": manifest["base_model"]["name"]}
        out = [_model("auto", created, {**common, "routed": True, "domains": snap.domains})]
        for entry in manifest["domains"]:
            out.append(
                _model(entry["name"], _timestamp(entry.get("finished")), {**common, **entry})
            )
        out.append(_model("base", created, {**common, "adapter": None}))
        return out

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": listing()}

    @app.get("/v1/models/{model}")
    def model(model: str):
        for entry in listing():
            if entry["id"] == model:
                return entry
        raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")


def _model(name: str, created: int, meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "crma", "crma": meta}


def _timestamp(text: str | None) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) if text else 0


# -- chat and completions ---------------------------------------------------------------------------
def _generation(app: FastAPI, server: Server) -> None:
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
        _, self.name, domain, confidence = await self._next()
        self.info = {"domain": self.name, "confidence": confidence, "requested": self.body.model}
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


# -- files ---------------------------------------------------------------------------------------------
def _files(app: FastAPI, server: Server) -> None:
    files = server.files

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose != "fine-tune":
            raise APIError(
                400, f"purpose {purpose!r}: crma serve keeps 'fine-tune' files", "purpose"
            )
        data = await file.read()
        return file_object(await run_in_threadpool(files.add, data, file.filename or ""))

    @app.get("/v1/files")
    def listing():
        return {"object": "list", "data": [file_object(f) for f in files.store.files()]}

    @app.get("/v1/files/{file_id}")
    def get(file_id: str):
        return file_object(files.get(file_id))

    @app.get("/v1/files/{file_id}/content")
    def content(file_id: str):
        files.get(file_id)
        return Response(files.path(file_id).read_bytes(), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete(file_id: str):
        files.get(file_id)
        busy = [
            j["id"]
            for j in server.store.jobs(limit=10**9)
            if j["training_file"] == file_id
            and j["status"] in ("validating_files", "queued", "running")
        ]
        if busy:
            raise APIError(
                409, f"{file_id} is the training file of job {busy[0]}", "file_id", "in_use"
            )
        files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}


# -- fine-tuning jobs ----------------------------------------------------------------------------------
def _jobs(app: FastAPI, server: Server) -> None:
    jobs = server.scheduler

    @app.post("/v1/fine_tuning/jobs")
    def create(body: JobRequest):
        return job_object(jobs.create(body, Stack.open(server.stack).domains))

    @app.get("/v1/fine_tuning/jobs")
    def listing(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
        if after is not None:
            jobs.get(after)
        found = server.store.jobs(after, limit + 1)
        return _page([job_object(j) for j in found], limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get(job_id: str):
        return job_object(jobs.get(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(
        job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
    ):
        jobs.get(job_id)
        return _page(server.store.events(job_id, after, limit + 1), limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        return job_object(jobs.cancel(job_id))


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
