"""The dashboard at `/`: server-rendered HTML views of the stack, its jobs and its forgetting.

`/` is a page shell (no data, no key needed); each view is an HTML fragment under `/ui/`, which
the page's script fetches with the bearer key, like every `/v1` path. A running job's charts poll
`/ui/jobs/{id}/series`. No build step, no network: the script and the styles are in `static/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from crma.serve.dashboard import views
from crma.serve.dashboard.format import FILTERS
from crma.serve.errors import APIError

if TYPE_CHECKING:
    from crma.serve.server import Server

HERE = Path(__file__).parent
NO_STORE = {"Cache-Control": "no-store"}
TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
)
TEMPLATES.filters.update(FILTERS)


def render(name: str, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), headers=NO_STORE)


def add_routes(app: FastAPI, server: Server) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return render("page.html", needs_key=server.api_key is not None)

    @app.get("/ui/stack", response_class=HTMLResponse)
    def stack():
        return render("stack.html", view=views.stack_view(server))

    @app.get("/ui/jobs", response_class=HTMLResponse)
    def jobs():
        return render("jobs.html", view=views.jobs_view(server))

    @app.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
    def job(job_id: str):
        found = views.job_summary(server, server.scheduler.get(job_id))
        events = [e for e in server.store.events(job_id, limit=50) if e["type"] == "message"]
        return render("job.html", job=found, events=events)

    @app.get("/ui/jobs/{job_id}/series")
    def series(job_id: str, after: Annotated[int, Query(ge=0)] = 0):
        return views.job_series(server, job_id, after)

    @app.get("/ui/forgetting", response_class=HTMLResponse)
    def forgetting():
        return render("forgetting.html", view=views.forgetting_view(server))

    @app.get("/ui/plots/{name}")
    def plot(name: str):
        path = views.report_plot(server, name)
        if path is None:
            raise APIError(404, f"no report figure {name!r} for this stack", "name", "not_found")
        return FileResponse(path, media_type="image/png")
