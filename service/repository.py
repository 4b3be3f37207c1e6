"""Owner-scoped reads of the service's own rows, written once for every resource.

As polar's ``get_one_or_none`` and full-stack-fastapi-template's CRUD modules do it: a
resource's module (jobs, datasets) asks here for a row its caller may see, and gets the
row or NotFound; a row of another owner answers exactly as a missing one (no leak of which
ids exist).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from service.db import Database
from service.errors import NotFound


class Owned(Protocol):
    """A mapped row with an owner."""

    owner: str


Row = TypeVar("Row", bound=Owned)


def get_owned(db: Database, model: type[Row], owner: str | None, row_id: int, noun: str) -> Row:
    """The `model` row with primary key `row_id`, if `owner` may see it (None: any owner).

    NotFound("no <noun> <id>") for a missing row and for another owner's alike. The row is
    returned detached from its (closed) session; deferred columns are not loaded.
    """
    with db.session() as s:
        row = s.get(model, row_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"no {noun} {row_id}")
    return row
