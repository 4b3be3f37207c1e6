"""The FastAPI application: thin routes over the jobs service."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from search import JobSpec
from service import jobs
from service.db import Database
from service.errors import DatabaseUnavailable, ServiceError, Unauthorized
from service.keys import authenticate
from service.models import ApiKey
from service.schemas import ErrorBody, JobPublic, JobsPublic, TrialsPublic
from service.settings import Settings, get_settings

log = logging.getLogger("hptune.api")

# How often the API process reaps trials of dead workers, even while no worker lives.
REAP_INTERVAL_S = 5.0

_bearer = HTTPBearer(auto_error=False)


def get_db(request: Request) -> Database:
    return request.app.state.db


DbDep = Annotated[Database, Depends(get_db)]


def current_key(
    db: DbDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    with db.session() as s:
        return authenticate(s, creds.credentials)


KeyDep = Annotated[ApiKey, Depends(current_key)]


def owner_scope(key: KeyDep) -> str | None:
    """The owner whose objects a request may see; admin keys see every owner's."""
    return None if key.is_admin else key.owner


OwnerDep = Annotated[str | None, Depends(owner_scope)]


def _reaper(db: Database, stop: threading.Event) -> None:
    while not stop.wait(REAP_INTERVAL_S):
        try:
            jobs.reap(db)
        except Exception as exc:  # the next round tries again; an outage must not kill it
            log.warning("reaper round failed: %s", exc)


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    """The API app on `settings`' database; the reaper thread runs while the app serves."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        reaper = threading.Thread(target=_reaper, args=(app.state.db, stop), daemon=True,
                                  name="reaper")
        reaper.start()
        yield
        stop.set()
        reaper.join(timeout=10)
        app.state.db.dispose()

    app = FastAPI(
        title="hptune",
        version="0.1.0",
        summary="Hyperparameter tuning jobs: Optuna search over a NumPy early-stopping trainer.",
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )
    app.state.db = db or jobs.open_database(settings)
    _install_error_handlers(app)

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
    def submit_job(spec: JobSpec, db: DbDep, key: KeyDep) -> dict[str, Any]:
        """Queue a tuning job; workers start on it at once."""
        return jobs.job_public(db, jobs.create_job(db, key.owner, spec), trials=[])

    @app.get("/api/v1/jobs", response_model=JobsPublic, tags=["jobs"])
    def list_jobs(db: DbDep, owner: OwnerDep,
                  limit: Annotated[int, Query(ge=1, le=500)] = 100,
                  offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        """The caller's jobs, newest first."""
        rows, count = jobs.list_jobs(db, owner, limit, offset)
        return {"data": [jobs.job_public(db, j) for j in rows], "count": count}

    @app.get("/api/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    def get_job(job_id: int, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """One job with its counts by trial state."""
        return jobs.job_public(db, jobs.get_job(db, owner, job_id))

    @app.delete("/api/v1/jobs/{job_id}", status_code=204, tags=["jobs"])
    def delete_job(job_id: int, db: DbDep, owner: OwnerDep) -> None:
        """Delete a finished job and its trials."""
        jobs.delete_job(db, owner, job_id)

    @app.post("/api/v1/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"])
    def cancel_job(job_id: int, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """Stop the job; its running trials stop within one epoch."""
        return jobs.job_public(db, jobs.cancel_job(db, owner, job_id))

    @app.get("/api/v1/jobs/{job_id}/trials", response_model=TrialsPublic, tags=["jobs"])
    def list_trials(job_id: int, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """Every trial of the job with its state, values and why it stopped."""
        data = jobs.job_trials(db, owner, job_id)
        return {"data": data, "count": len(data)}

    @app.get("/api/v1/jobs/{job_id}/report", tags=["jobs"])
    def report(job_id: int, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
        """The early-stopped trial report: best trial, stopped trials, compute saved."""
        return jobs.job_report(db, owner, job_id)

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
            headers = {"Retry-After": "5"}
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else []
        return _error(exc.status_code, exc.message, errors, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field; never echo the input back (it may hold NaN, which JSON cannot carry).
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
            # Drop pydantic's union-branch labels such as "FloatRange" from the path.
            loc = [p for p in loc if not p[:1].isupper()]
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
