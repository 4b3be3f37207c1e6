"""Uploaded datasets: upload, list, read, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse

from service import datasets, idempotency
from service.deps import DbDep, IdempotencyKeyDep, JobId, KeyDep, OwnerDep
from service.errors import TooLarge
from service.routes import idempotent_response, next_page
from service.schemas import DatasetPublic, DatasetsPublic

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic)
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


@router.get("", response_model=DatasetsPublic)
def list_datasets(db: DbDep, owner: OwnerDep,
                  after: Annotated[int | None, Query(
                      ge=0, le=2**31 - 1,
                      description="cursor: the last dataset id seen")] = None,
                  limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 100,
                  ) -> dict[str, Any]:
    """Your uploaded datasets in id order, a page at a time: follow `next` until it is
    null. `count` is all of them."""
    rows, count = datasets.list_datasets_page(db, owner, after, limit + 1)
    more, rows = len(rows) > limit, rows[:limit]
    return {"data": [datasets.dataset_public(r) for r in rows], "count": count,
            "next": next_page(router.prefix, rows[-1].id if more else None, limit)}


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: JobId, db: DbDep, owner: OwnerDep) -> dict[str, Any]:
    """One uploaded dataset's description."""
    return datasets.dataset_public(datasets.get_dataset(db, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: JobId, db: DbDep, owner: OwnerDep) -> None:
    """Delete an uploaded dataset; 409 while a queued or running job uses it."""
    datasets.delete_dataset(db, owner, dataset_id)
