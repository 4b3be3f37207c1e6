"""The FastAPI application: settings, middleware, error handlers, the reaper thread, and the
routers of service.routes."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import idempotency, reaper, scheduler
from service.dashboard import DashboardGate
from service.db import Database
from service.deps import lookup_key, no_unknown_query
from service.errors import DatabaseUnavailable, QuotaExceeded, ServiceError, Unauthorized
from service.keys import VerifiedKeys
from service.limits import OwnerSlots
from service.metrics import metrics_registry
from service.middleware import ApiKeyGate, BodyLimit, SecurityHeaders
from service.routes import datasets as dataset_routes
from service.routes import jobs as job_routes
from service.routes import models as model_routes
from service.routes import ops
from service.schemas import ErrorBody
from service.settings import Settings, get_settings
from service.trial_pages import TrialJsonCache

log = logging.getLogger("hptune.api")

# Paths outside /api/v1 that need an admin key: the metrics tell about every owner.
ADMIN_PATHS = ("/metrics",)

# The API's routers, one per resource. FastAPI keeps an included router as one entry of
# app.routes, so the 405 handler reads their routes from here.
ROUTERS = (ops.router, job_routes.router, model_routes.router, dataset_routes.router)


def _reaper(db: Database, stop: threading.Event) -> None:
    while not stop.wait(db.settings.reap_interval):
        try:
            reaper.reap(db)
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
        reaper_thread = threading.Thread(target=_reaper, args=(app.state.db, stop),
                                         daemon=True, name="reaper")
        reaper_thread.start()
        yield
        stop.set()
        if on_shutdown is not None:
            await anyio.to_thread.run_sync(on_shutdown)
        reaper_thread.join(timeout=10)
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
    app.state.db = db or scheduler.open_database(settings)
    app.state.streams = OwnerSlots(settings.max_streams_per_owner, "event streams")
    app.state.renders = OwnerSlots(settings.max_renders_per_owner, "report renders")
    app.state.metrics = metrics_registry(app.state.db)
    app.state.trial_json = TrialJsonCache()
    _install_error_handlers(app)
    # Added innermost first. A request meets: security headers, the body limits, the key
    # check (before any body is read), the dashboard's gate, then the routes.
    db_ = app.state.db
    keys = app.state.verified_keys = VerifiedKeys(settings.key_cache_seconds)
    app.add_middleware(DashboardGate, db=db_)
    app.add_middleware(ApiKeyGate, known=keys.get, admin_paths=ADMIN_PATHS,
                       authenticate=lambda token: keys.verify(
                           token, lambda t: lookup_key(db_, t)))
    app.add_middleware(
        BodyLimit,
        limit_for=lambda path: (settings.max_upload_bytes + 64 * 1024
                                if path.startswith("/api/v1/datasets")
                                else settings.max_request_bytes),
        idle_timeout_s=settings.body_idle_timeout_seconds,
    )
    app.add_middleware(SecurityHeaders)

    for router in ROUTERS:
        app.include_router(router)
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
            for route in [*req.app.routes, *(r for router in ROUTERS for r in router.routes)]:
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
