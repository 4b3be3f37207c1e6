"""The API's routes, one APIRouter per resource, joined in service.api.create_app."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service import idempotency


def idempotent_response(outcome: idempotency.Outcome) -> JSONResponse:
    """A keyed POST's answer; a stored one says so."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)
