"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import text

from service.deps import DbDep, KeyDep, MetricsRegistryDep
from service.metrics import render

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(db: DbDep) -> dict[str, str]:
    """Readiness: the database answers."""
    with db.session() as s:
        s.execute(text("SELECT 1"))
    return {"status": "ready"}


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
def metrics(_key: KeyDep, registry: MetricsRegistryDep) -> Response:
    """Prometheus metrics: jobs, trials, durations, epochs saved, live workers (admin keys
    only: they count every owner's work)."""
    return Response(render(registry), media_type="text/plain; version=0.0.4")
