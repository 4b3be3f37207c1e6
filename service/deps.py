"""The routes' typed dependencies, as `Annotated` aliases: the database, the caller's key and
owner scope, ids, the Idempotency-Key header, and the per-app state the routes share.

Those that only read the request or the app's state are `async def`: FastAPI runs a plain
`def` dependency in a worker thread, and each such hop cost a keyed read more than its
database work did (benchmarks/RESULTS_api_keyed_reads.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from service import idempotency
from service.db import Database
from service.errors import Unauthorized
from service.events import Cursor, event_cursor
from service.keys import authenticate
from service.limits import OwnerSlots
from service.models import ApiKey
from service.trial_pages import TrialJsonCache

_bearer = HTTPBearer(auto_error=False)

# Ids are database integers: bounded so that a huge number is a 422, not a driver overflow.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


async def no_unknown_query(request: Request) -> None:
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


async def get_db(request: Request) -> Database:
    return request.app.state.db


DbDep = Annotated[Database, Depends(get_db)]


async def current_key(
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
    return await run_in_threadpool(lookup_key, db, creds.credentials)


def lookup_key(db: Database, token: str) -> ApiKey:
    """The live key row for `token` (detached from its session), or Unauthorized."""
    with db.session() as s:
        row = authenticate(s, token)
        s.expunge(row)
        return row


KeyDep = Annotated[ApiKey, Depends(current_key)]


async def owner_scope(key: KeyDep) -> str | None:
    """The owner whose objects a request may see; admin keys see every owner's."""
    return None if key.is_admin else key.owner


OwnerDep = Annotated[str | None, Depends(owner_scope)]


def _key_schema(schema: dict[str, Any]) -> None:
    # A header is absent or a string (never null), bounded as parse_key checks it; parse_key,
    # not FastAPI, refuses a bad one, so that its 422 names the header.
    schema.pop("anyOf", None)
    schema.update(type="string", minLength=1, maxLength=idempotency.KEY_MAX_CHARS,
                  pattern=idempotency.KEY_PATTERN)


async def idempotency_key(value: Annotated[str | None, Header(
    alias=idempotency.HEADER, description=idempotency.KEY_DESCRIPTION,
    json_schema_extra=_key_schema)] = None) -> str | None:
    """The request's Idempotency-Key, or None without one."""
    return idempotency.parse_key(value)


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


async def get_streams(request: Request) -> OwnerSlots:
    """The app's event-stream slots per owner."""
    return request.app.state.streams


async def get_renders(request: Request) -> OwnerSlots:
    """The app's report-render slots per owner."""
    return request.app.state.renders


async def get_metrics_registry(request: Request) -> CollectorRegistry:
    """The app's Prometheus registry."""
    return request.app.state.metrics


async def get_trial_json(request: Request) -> TrialJsonCache:
    """The app's cache of finished trials' JSON (service.trial_pages)."""
    return request.app.state.trial_json


StreamsDep = Annotated[OwnerSlots, Depends(get_streams)]
TrialJsonDep = Annotated[TrialJsonCache, Depends(get_trial_json)]
EventCursorDep = Annotated[Cursor | None, Depends(event_cursor)]
RendersDep = Annotated[OwnerSlots, Depends(get_renders)]
MetricsRegistryDep = Annotated[CollectorRegistry, Depends(get_metrics_registry)]
