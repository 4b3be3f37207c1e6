"""The FastAPI application: thin routes over the jobs service."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from search import JobSpec
from service import datasets, idempotency, jobs
from service.dashboard import DashboardGate
from service.db import Database
from service.errors import (
    DatabaseUnavailable,
    QuotaExceeded,
    ServiceError,
    TooLarge,
    Unauthorized,
)
from service.keys import authenticate
from service.limits import OwnerSlots
from service.metrics import metrics_registry, render
from service.middleware import ApiKeyGate, BodyLimit, SecurityHeaders
from service.models import ApiKey
from service.schemas import (
    DatasetPublic,
    DatasetsPublic,
    ErrorBody,
    JobPublic,
    JobsPublic,
    TrialsPublic,
)
from service.settings import Settings, get_settings

log = logging.getLogger("hptune.api")

# How often the API process reaps trials of dead workers, even while no worker lives.
REAP_INTERVAL_S = 5.0

_bearer = HTTPBearer(auto_error=False)

# The HTML report is one self-contained page: inline styles and data: images, no script.
REPORT_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")

# Paths outside /api/v1 that need an admin key: the metrics tell about every owner.
ADMIN_PATHS = ("/metrics",)

# Ids are database integers: bounded so that a huge number is a 422, not a driver overflow.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
ReportFormat = Literal["json", "html", "csv"]


def jsonable(value: Any) -> Any:
    """The report with non-finite floats as null, so it is always valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def no_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: a typo (`?limt=5`) should be told,
    not silently ignored."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {p.alias for p in _query_params(dependant)}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError([
            {"loc": ("query", name), "msg": f"unknown query parameter; known: "
             f"{', '.join(sorted(known)) or 'none'}", "type": "extra_forbidden"}
            for name in unknown[:10]])


def _query_params(dependant: Any) -> list[Any]:
    out = list(dependant.query_params)
    for sub in dependant.dependencies:
        out += _query_params(sub)
    return out


def get_db(request: Request) -> Database:
    return request.app.state.db


DbDep = Annotated[Database, Depends(get_db)]


def current_key(
    request: Request,
    db: DbDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The request's key: ApiKeyGate checked it before the body was read."""
    key = getattr(request.state, "api_key", None)
    if key is not None:
        return key
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return lookup_key(db, creds.credentials)


def lookup_key(db: Database, token: str) -> ApiKey:
    """The live key row for `token` (detached from its session), or Unauthorized."""
    with db.session() as s:
        row = authenticate(s, token)
        s.expunge(row)
        return row


KeyDep = Annotated[ApiKey, Depends(current_key)]


def owner_scope(key: KeyDep) -> str | None:
    """The owner whose objects a request may see; admin keys see every owner's."""
    return None if key.is_admin else key.owner


OwnerDep = Annotated[str | None, Depends(owner_scope)]


def _key_schema(schema: dict[str, Any]) -> None:
    # A header is absent or a string (never null), bounded as parse_key checks it; parse_key,
    # not FastAPI, refuses a bad one, so that its 422 names the header.
    schema.pop("anyOf", None)
    schema.update(type="string", minLength=1, maxLength=idempotency.KEY_MAX_CHARS,
                  pattern=idempotency.KEY_PATTERN)


def idempotency_key(value: Annotated[str | None, Header(
    alias=idempotency.HEADER, description=idempotency.KEY_DESCRIPTION,
    json_schema_extra=_key_schema)] = None) -> str | None:
    """The request's Idempotency-Key, or None without one."""
    return idempotency.parse_key(value)


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


def idempotent_response(outcome: idempotency.Outcome) -> JSONResponse:
    """A keyed POST's answer; a stored one says so."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


def _held_stream(slots: OwnerSlots, owner: str, stream: AsyncIterator[str]
                 ) -> StreamingResponse:
    """An event-stream response holding one of `owner`'s stream slots: taken now (429 before
    anything streams), given back once when the stream ends, however it ends."""
    slots.acquire(owner)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            slots.release(owner)

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            release()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(release))


def _reaper(db: Database, stop: threading.Event) -> None:
    while not stop.wait(REAP_INTERVAL_S):
        try:
            jobs.reap(db)
        except Exception as exc:  # the next round tries again; an outage must not kill it
            log.warning("reaper round failed: %s", exc)


def create_app(settings: Settings | None = None, db: Database | None = None,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The API app on `settings`' database; the reaper thread runs while the app serves.

    `on_shutdown` runs (in a thread) when the server stops, before it exits: `hptune serve`
    stops its embedded workers there.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        reaper = threading.Thread(target=_reaper, args=(app.state.db, stop), daemon=True,
                                  name="reaper")
        reaper.start()
        yield
        stop.set()
        if on_shutdown is not None:
            await anyio.to_thread.run_sync(on_shutdown)
        reaper.join(timeout=10)
        app.state.db.dispose()

    app = FastAPI(
        title="hptune",
        version="0.1.0",
        summary="Hyperparameter tuning jobs: Optuna search over a NumPy early-stopping trainer.",
        lifespan=lifespan,
        responses={code: {"model": ErrorBody}
                   for code in (400, 401, 403, 404, 408, 409, 413, 422, 429, 503)},
        dependencies=[Depends(no_unknown_query)],
    )
    app.state.db = db or jobs.open_database(settings)
    app.state.streams = OwnerSlots(settings.max_streams_per_owner, "event streams")
    app.state.renders = OwnerSlots(settings.max_renders_per_owner, "report renders")
    _install_error_handlers(app)
    # Added innermost first. A request meets: security headers, the body limits, the key
    # check (before any body is read), the dashboard's gate, then the routes.
    db_ = app.state.db
    app.add_middleware(DashboardGate, db=db_)
    app.add_middleware(ApiKeyGate, authenticate=lambda token: lookup_key(db_, token),
                       admin_paths=ADMIN_PATHS)
    app.add_middleware(
        BodyLimit,
        limit_for=lambda path: (settings.max_upload_bytes + 64 * 1024
                                if path.startswith("/api/v1/datasets")
                                else settings.max_request_bytes),
        idle_timeout_s=settings.body_idle_timeout_seconds,
    )
    app.add_middleware(SecurityHeaders)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(db: DbDep) -> dict[str, str]:
        """Readiness: the database answers."""
        with db.session() as s:
            s.execute(text("SELECT 1"))
        return {"status": "ready"}

    @app.post("/api/v1/jobs", status_code=201, response_model=JobPublic, tags=["jobs"])
    def submit_job(spec: JobSpec, db: DbDep, key: KeyDep, idem_key: IdempotencyKeyDep
                   ) -> JSONResponse:
        """Queue a tuning job; workers start on it at once. With an Idempotency-Key, a retry
        answers the first job instead of making a second."""
        return idempotent_response(idempotency.submit_job(db, key.owner, spec, idem_key))

    @app.get("/api/v1/jobs", response_model=JobsPublic, tags=["jobs"])
    def list_jobs(db: DbDep, owner: OwnerDep,
                  limit: Annotated[int, Query(ge=1, le=500)] = 100,
                  offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> dict[str, Any]:
        """The caller's jobs, newest first."""
        rows, count = jobs.list_jobs(db, owner, limit, offset)
        return {"data": jobs.jobs_public(db, rows), "count": count}

    @app.get("/api/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    def get_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """One job with its counts by trial state."""
        return jobs.job_public(db, jobs.get_job(db, owner, job_id))

    @app.delete("/api/v1/jobs/{job_id}", status_code=204, tags=["jobs"])
    def delete_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> None:
        """Delete a finished job and its trials."""
        jobs.delete_job(db, owner, job_id)

    @app.post("/api/v1/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"])
    def cancel_job(job_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """Stop the job; its running trials stop within one epoch."""
        return jobs.job_public(db, jobs.cancel_job(db, owner, job_id))

    @app.get("/api/v1/jobs/{job_id}/trials", response_model=TrialsPublic, tags=["jobs"])
    def list_trials(job_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """Every trial of the job with its state, values and why it stopped."""
        data = jobs.job_trials(db, owner, job_id)
        return {"data": data, "count": len(data)}

    @app.get("/api/v1/jobs/{job_id}/report", tags=["jobs"],
             responses={200: {"content": {"application/json": {}, "text/html": {},
                                          "text/csv": {}}}})
    def report(job_id: JobId, db: DbDep, key: KeyDep, owner: OwnerDep,
               format: Annotated[ReportFormat, Query(description="json, html or csv")] = "json",
               ) -> Response:
        """The early-stopped trial report: best trial, stopped trials, compute saved."""
        with app.state.renders.slot(key.owner):
            if format == "html":
                return HTMLResponse(jobs.job_report_html(db, owner, job_id),
                                    headers={"Content-Security-Policy": REPORT_CSP})
            if format == "csv":
                return PlainTextResponse(
                    jobs.job_report_csv(db, owner, job_id), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'})
            return JSONResponse(jsonable(jsonable_encoder(jobs.job_report(db, owner, job_id))))

    @app.get("/api/v1/jobs/{job_id}/plots/{name}", tags=["jobs"],
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}})
    def plot(job_id: JobId, name: Annotated[str, Path(max_length=50)], db: DbDep,
             key: KeyDep, owner: OwnerDep,
             width: Annotated[int, Query(ge=200, le=4000)] = 1000,
             height: Annotated[int, Query(ge=200, le=4000)] = 600) -> Response:
        """A report picture as PNG: learning_curves, history, importances, lr_vs_batch."""
        with app.state.renders.slot(key.owner):
            png = jobs.job_plot(db, owner, job_id, name, width, height)
        return Response(png, media_type="image/png")

    @app.get("/api/v1/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}}}})
    def events(job_id: JobId, db: DbDep, key: KeyDep, owner: OwnerDep) -> StreamingResponse:
        """Server-sent events: trial state changes, then the job's final state."""
        stream = jobs.job_events(db, owner, job_id, key.id)
        return _held_stream(app.state.streams, key.owner, stream)

    @app.post("/api/v1/datasets", status_code=201, response_model=DatasetPublic,
              tags=["datasets"])
    def upload_dataset(
        db: DbDep, key: KeyDep,
        file: Annotated[UploadFile, File(description="CSV with a header row, or NPZ (X, y)")],
        idem_key: IdempotencyKeyDep,
        target: Annotated[str | None, Form(max_length=200)] = None,
        name: Annotated[str | None, Form(max_length=200)] = None,
    ) -> JSONResponse:
        """Upload a dataset; jobs may then name it by its id. With an Idempotency-Key, a retry
        answers the first dataset instead of storing a second."""
        limit = db.settings.max_upload_bytes
        raw = file.file.read(limit + 1)
        if len(raw) > limit:
            raise TooLarge(f"file larger than {limit} bytes", field="file")
        return idempotent_response(idempotency.upload_dataset(
            db, key.owner, file.filename or "upload", raw, target, name, idem_key))

    @app.get("/api/v1/datasets", response_model=DatasetsPublic, tags=["datasets"])
    def list_datasets(db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """Your uploaded datasets."""
        rows = [datasets.dataset_public(r) for r in datasets.list_datasets(db, owner)]
        return {"data": rows, "count": len(rows)}

    @app.get("/api/v1/datasets/{dataset_id}", response_model=DatasetPublic, tags=["datasets"])
    def get_dataset(dataset_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """One uploaded dataset's description."""
        return datasets.dataset_public(datasets.get_dataset(db, owner, dataset_id))

    @app.delete("/api/v1/datasets/{dataset_id}", status_code=204, tags=["datasets"])
    def delete_dataset(dataset_id: JobId, db: DbDep, owner: OwnerDep) -> None:
        """Delete an uploaded dataset; 409 while a queued or running job uses it."""
        datasets.delete_dataset(db, owner, dataset_id)

    registry = metrics_registry(app.state.db)

    @app.get("/metrics", tags=["ops"], responses={200: {"content": {"text/plain": {}}}})
    def metrics(_key: KeyDep) -> Response:
        """Prometheus metrics: jobs, trials, durations, epochs saved, live workers (admin keys
        only: they count every owner's work)."""
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    return app


def _error(status: int, detail: str, errors: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status_code=status,
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_req: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, DatabaseUnavailable):
            # The driver's words (host, port, user) go to the log, never to the client.
            log.warning("%s", exc.message)
            return _error(503, "database unavailable, try again shortly",
                          headers={"Retry-After": "5"})
        if isinstance(exc, QuotaExceeded):
            headers = {"Retry-After": "60"}
        if isinstance(exc, idempotency.RequestInProgress):
            headers = {"Retry-After": str(exc.retry_after_s)}
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else []
        return _error(exc.status_code, exc.message, errors, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; list them all.
            methods = set()
            for route in req.app.routes:
                match, _ = route.matches(req.scope)
                if match != Match.NONE and getattr(route, "methods", None):
                    methods |= route.methods
            headers["Allow"] = ", ".join(sorted(methods))
        return _error(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field; never echo the input back (it may hold NaN, which JSON cannot carry).
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
            # Drop model names and pydantic's union and validator tags (`function-after[...]`).
            loc = [p for p in loc if not p[:1].isupper() and "[" not in p]
            errors.append({"field": ".".join(loc) or None, "message": str(err.get("msg"))})
        fields = ", ".join(sorted({e["field"] for e in errors if e["field"]}))
        return _error(422, f"invalid request: {fields or 'body'}", errors)

    @app.exception_handler(OperationalError)
    async def db_down(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc.orig)[:200])
        return _error(503, "database unavailable, try again shortly", headers={"Retry-After": "5"})

    @app.exception_handler(DBAPIError)
    async def db_error(_req: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database error: %s", str(exc.orig)[:200])
        return _error(503, "database error, try again shortly", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "internal error")
