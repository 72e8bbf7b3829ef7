"""The FastAPI app: OpenAI routes, health, metrics and the dashboard over one `Server`."""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from crma.serve import dashboard, fine_tuning, generation
from crma.serve.errors import APIError
from crma.serve.guard import Guard
from crma.serve.server import Server

log = logging.getLogger(__name__)


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
    generation.add_routes(app, server)
    fine_tuning.add_file_routes(app, server)
    fine_tuning.add_job_routes(app, server)
    dashboard.add_routes(app, server)
    return app


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
