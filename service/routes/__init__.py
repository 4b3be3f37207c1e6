"""The API's routes, one APIRouter per resource, joined in service.api.create_app."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlencode

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter

from service import idempotency


def idempotent_response(outcome: idempotency.Outcome) -> JSONResponse:
    """A keyed POST's answer; a stored one says so."""
    headers = {idempotency.REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


def next_page(path: str, after: int | None, limit: int) -> str | None:
    """The `next` link of a list page: `path` with the cursor after the page's last item, or
    None on the last page (`after` None)."""
    return None if after is None else f"{path}?{urlencode({'after': after, 'limit': limit})}"


@functools.cache
def _adapter(model: type[BaseModel]) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def model_response(model: type[BaseModel], content: Any) -> Response:
    """`content` sent as the route's `response_model` would send it (validated, then dumped
    by pydantic: the same bytes), but in the route's own thread. Given a dict, FastAPI
    validates it in one more worker thread of its own before dumping it."""
    adapter = _adapter(model)
    body = adapter.dump_json(adapter.validate_python(content, from_attributes=True),
                             by_alias=True)
    return Response(body, media_type="application/json")
