"""The FastAPI app the plugin mounts at `/upsample-reports`: run list, run page, output specs and a JSON API.

Airflow gives plugin apps no authentication, so the app itself requires a signed-in user with read access to the
DAG's runs (the UI's `_token` cookie or a bearer token). Routes are sync `def`s: FastAPI runs them in a threadpool,
which keeps the file and DB reads of the run finders (`reports`) off the event loop. Templates autoescape every value,
pages carry a nonce-based Content-Security-Policy, and output specs are served as JSON only when the report names them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_authenticated
from airflow.configuration import conf
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi import status as http_status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader

from include.cosmos_upsample.report_model import FinalStatus
from include.cosmos_upsample.storage import is_remote
from upsample_reports import charts, frames
from upsample_reports.reports import DAG_ID, ReportNotFound, RunIndex, item_output_file, load_report
from upsample_reports.views import MAX_RUNS_PER_PAGE, RUNS_PER_PAGE, run_context, summaries, summary

PACKAGE_DIR = Path(__file__).resolve().parent


def requires_dag_run_read(user: GetUserDep) -> None:
    """Reports hold the DAG's params and prompts: the same right as reading its runs in the Airflow UI."""
    team_name = None
    if conf.getboolean("core", "multi_team", fallback=False):
        from airflow.models.dag import DagModel

        team_name = DagModel.get_team_name(DAG_ID)
    allowed = get_auth_manager().is_authorized_dag(
        method="GET",
        access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=DAG_ID, team_name=team_name),
        user=user,
    )
    if not allowed:
        raise HTTPException(http_status.HTTP_403_FORBIDDEN, f"Forbidden: reading runs of {DAG_ID}")


def _templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(PACKAGE_DIR / "templates"), autoescape=True)
    env.filters["seconds"] = charts.format_seconds
    env.filters["when"] = _format_time
    env.filters["percent"] = lambda share: f"{share:.0%}"
    return Jinja2Templates(env=env)


def _format_time(value: str | datetime | None) -> str:
    if not value:
        return "–"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


class _Links:
    """Root-relative URLs under wherever Airflow mounted the app (honours `[api] base_url`)."""

    def __init__(self, request: Request) -> None:
        self.base = str(request.scope.get("root_path", "")).rstrip("/")

    def home(self) -> str:
        return f"{self.base}/"

    def css(self) -> str:
        return f"{self.base}/static/report.css"

    def run(self, run_id: str, **query: Any) -> str:
        params = {key: value for key, value in query.items() if value not in (None, "")}
        suffix = f"?{urlencode(params)}" if params else ""
        return f"{self.base}/runs/{quote(run_id, safe='')}{suffix}"

    def item(self, run_id: str, spec_id: str) -> str:
        return f"{self.base}/runs/{quote(run_id, safe='')}/items/{quote(spec_id, safe='')}"

    def frame(self, run_id: str, spec_id: str, index: int) -> str:
        return f"{self.item(run_id, spec_id)}/frames/{index}"

    def api_runs(self) -> str:
        return f"{self.base}/api/runs"

    def api_run(self, run_id: str) -> str:
        return f"{self.base}/api/runs/{quote(run_id, safe='')}"


router = APIRouter()


def create_app(index: RunIndex | Callable[[], RunIndex] | None = None) -> FastAPI:
    """The plugin app; `index` (or a factory for it) replaces the metadata-DB + default-dir lookup in tests."""
    app = FastAPI(
        title="Upsample reports",
        dependencies=[Depends(requires_authenticated()), Depends(requires_dag_run_read)],
        # The docs routes would bypass the app's dependencies; nothing here may answer a signed-out user.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    if index is None:
        app.state.run_index = RunIndex.default
    elif isinstance(index, RunIndex):
        app.state.run_index = lambda: index
    else:
        app.state.run_index = index
    app.state.templates = _templates()
    app.include_router(router)
    return app


def _index(request: Request) -> RunIndex:
    return request.app.state.run_index()


def _render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    headers = {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }
    context = {"links": _Links(request), "nonce": nonce, "dag_id": DAG_ID, **context}
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=headers)


def _no_run(run_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"No run {run_id!r} of {DAG_ID}"}, status_code=404)


@router.get("/static/report.css", include_in_schema=False)
def stylesheet() -> FileResponse:
    return FileResponse(PACKAGE_DIR / "static" / "report.css", media_type="text/css")


@router.get("/", response_class=HTMLResponse)
def run_list(request: Request, page: int = Query(1, ge=1)) -> HTMLResponse:
    return _render(request, "runs.html", summaries(_index(request), page))


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request,
    run_id: str,
    status: FinalStatus | None = None,
    page: int = Query(1, ge=1),
    dag_id: str | None = None,
) -> HTMLResponse:
    if dag_id is not None and dag_id != DAG_ID:
        # The DAG-run tab shows on every DAG's runs; Airflow cannot limit it to one DAG.
        return _render(request, "not_upsampling.html", {"run_id": run_id, "other_dag_id": dag_id})
    try:
        record = _index(request).run(run_id)
    except ReportNotFound:
        return _render(request, "not_found.html", {"run_id": run_id}, status_code=404)
    report = load_report(record.report_path) if record.report_path else None
    context = run_context(record, report, status, page)
    context["frames"] = {spec_id: len(paths) for spec_id, paths in
                         frames.item_frames(frames.run_folder_of(record)).items()} if report else {}
    return _render(request, "run.html", context)


# A file served as it is (an output spec, a hint frame): never sniffed as another type, never run as a page.
SANDBOXED_FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


@router.get("/runs/{run_id}/items/{spec_id}")
def output_spec(request: Request, run_id: str, spec_id: str) -> Response:
    try:
        record = _index(request).run(run_id)
    except ReportNotFound:
        return _no_run(run_id)
    report = load_report(record.report_path) if record.report_path else None
    path = item_output_file(report, record.report_path, spec_id) if report and record.report_path else None
    if path is None:
        return JSONResponse({"detail": f"The report of {run_id!r} names no output for {spec_id!r}"}, 404)
    headers = SANDBOXED_FILE_HEADERS
    if is_remote(path):  # an output in object storage (size checked by item_output_file)
        return Response(path.read_bytes(), media_type="application/json", headers=headers)
    return FileResponse(path, media_type="application/json", headers=headers)


@router.get("/runs/{run_id}/items/{spec_id}/frames/{index}")
def hint_frame(request: Request, run_id: str, spec_id: str, index: int = PathParam(ge=0, le=64)) -> Response:
    """A hint frame the model saw for an item (thumbnails on the run page, links in the review step): only a file the
    run's own items name (see frames.py)."""
    try:
        record = _index(request).run(run_id)
    except ReportNotFound:
        return _no_run(run_id)
    path = frames.frame_file(frames.run_folder_of(record), spec_id, index)
    if path is None:
        return JSONResponse({"detail": f"Run {run_id!r} names no frame {index} for {spec_id!r}"}, 404)
    headers = {**SANDBOXED_FILE_HEADERS, "Cache-Control": "private, max-age=3600"}
    return FileResponse(path, media_type="image/jpeg", headers=headers)


@router.get("/api/runs")
def api_runs(request: Request, page: int = Query(1, ge=1),
             per_page: int = Query(RUNS_PER_PAGE, ge=1, le=MAX_RUNS_PER_PAGE)) -> dict[str, Any]:
    return {"dag_id": DAG_ID, **summaries(_index(request), page, per_page)}


@router.get("/api/runs/{run_id}")
def api_run(request: Request, run_id: str) -> Response:
    try:
        record = _index(request).run(run_id)
    except ReportNotFound:
        return _no_run(run_id)
    report = load_report(record.report_path) if record.report_path else None
    if report is None:
        return JSONResponse({"detail": f"Run {run_id!r} has no report yet", **summary(record, None)}, 404)
    return JSONResponse(report.to_json())

