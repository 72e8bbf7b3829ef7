"""The OpenAI files and fine-tuning jobs routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from crma.serve.errors import APIError
from crma.serve.files import file_object
from crma.serve.jobs import job_object, route_file
from crma.serve.schemas import JobRequest
from crma.serve.store import ACTIVE
from crma.stack import Stack

if TYPE_CHECKING:
    from crma.serve.server import Server


def add_file_routes(app: FastAPI, server: Server) -> None:
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
            if file_id in (j["training_file"], route_file(j)) and j["status"] in ACTIVE
        ]
        if busy:
            raise APIError(409, f"{file_id} is a file of job {busy[0]}", "file_id", "in_use")
        files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def add_job_routes(app: FastAPI, server: Server) -> None:
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
