"""The API's routes, one APIRouter per resource, joined in service.api.create_app."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi.responses import JSONResponse

from service import idempotency


def idempotent_response(outcome: idempotency.Outcome) -> JSONResponse:
    """A keyed POST's answer; a stored one says so."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


def next_page(path: str, after: int | None, limit: int) -> str | None:
    """The `next` link of a list page: `path` with the cursor after the page's last item, or
    None on the last page (`after` None)."""
    return None if after is None else f"{path}?{urlencode({'after': after, 'limit': limit})}"
