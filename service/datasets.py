"""Uploaded datasets: the repository of checked uploads (create, get, list, delete), the
owners' dataset quotas, and the workers' cache of the arrays a job trains on.

Parsing and checking an upload's bytes (and the memory budget it keeps to) live in
service.uploads, service.uploads_csv and service.uploads_npz; this module stores what they
return.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select

from search import JobSpec
from search.datasets import bundled, from_arrays
from search.spec import control_character
from service.db import Database
from service.errors import Conflict, NotFound, QuotaExceeded
from service.models import Job, UploadedDataset, as_utc
from service.repository import get_owned
from service.retry import DB_RETRY
from service.settings import Settings
from service.status import ACTIVE
from service.uploads import check_trainable, compress, fail, task_of
from service.uploads_csv import parse_csv
from service.uploads_npz import parse_npz
from trainer import Task


def _check_dataset_quota(session: Any, settings: Settings, owner: str,
                         new_bytes: int | None) -> None:
    """Refuse an upload over the owner's dataset quotas (count, and stored bytes). With
    `new_bytes` None (its size is not known yet) only an owner already at a quota is refused."""
    count, used = session.execute(
        select(func.count(), func.coalesce(func.sum(UploadedDataset.size_bytes), 0))
        .where(UploadedDataset.owner == owner)
    ).one()
    quota = settings.max_datasets_per_owner
    if count + 1 > quota:
        raise QuotaExceeded(f"{owner} already has {count} datasets (quota {quota}, "
                            f"HPTUNE_MAX_DATASETS_PER_OWNER); delete one first", field="file")
    quota = settings.max_dataset_bytes_per_owner
    if new_bytes is None and used >= quota:
        raise QuotaExceeded(f"{owner}'s datasets take {used} bytes, the whole quota of {quota} "
                            f"bytes (HPTUNE_MAX_DATASET_BYTES_PER_OWNER); delete one first",
                            field="file")
    if new_bytes is not None and used + new_bytes > quota:
        raise QuotaExceeded(f"{owner}'s datasets take {used} bytes; this one ({new_bytes} bytes "
                            f"stored) would pass the quota of {quota} bytes "
                            f"(HPTUNE_MAX_DATASET_BYTES_PER_OWNER)", field="file")


def create_dataset(db: Database, owner: str, filename: str, raw: bytes, target: str | None,
                   name: str | None,
                   on_insert: Callable[[Any, int], None] | None = None) -> UploadedDataset:
    """Parse, check and store an upload; answers with the stored row.

    The owner's quotas are checked before parsing (cheaply, to refuse early) and again under
    the owner's lock together with the insert, so that concurrent uploads, on any number of
    API processes, cannot pass them together.
    """
    for field, label, text in (("file", "the file name", filename), ("name", "name", name)):
        bad = control_character(text or "")
        if bad is not None:
            raise fail(f"{label} must not contain control characters (found {bad})", field)
    settings = db.settings
    with db.session() as s:
        _check_dataset_quota(s, settings, owner, None)
    is_npz = filename.lower().endswith(".npz") or raw[:4] == b"PK\x03\x04"
    if is_npz:
        X, y, features = parse_npz(raw, settings.max_upload_bytes, settings.max_parse_bytes)
    else:
        X, y, features = parse_csv(raw, target, settings.max_parse_bytes)
    classes, counts = np.unique(y, return_counts=True)
    task = task_of(classes)
    check_trainable(len(X), classes, counts, task)
    n_rows, n_features = X.shape
    n_classes = len(classes) if task != Task.REGRESSION else 1
    y = y.astype(np.int64) if task != Task.REGRESSION else y.astype(np.float32)
    del classes, counts
    content = compress(X, y)
    del X, y  # the insert below may copy `content` once more
    row = UploadedDataset(
        owner=owner, name=(name or filename or "upload")[:200], filename=filename[:200],
        format="npz" if is_npz else "csv", target=target if not is_npz else None,
        task=task, n_rows=n_rows, n_features=n_features, n_classes=n_classes,
        features=features[:1000], sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content), content=content,
    )
    with db.owner_session(owner) as s:
        _check_dataset_quota(s, settings, owner, len(content))
        s.add(row)
        s.flush()
        if on_insert is not None:
            # In the insert's transaction (idempotency.Claim.record): both commit, or neither.
            on_insert(s, row.id)
        s.expunge(row)
    return row


def get_dataset(db: Database, owner: str | None, dataset_id: int) -> UploadedDataset:
    """The dataset's row (without its content), if `owner` may see it (None: any owner)."""
    return get_owned(db, UploadedDataset, owner, dataset_id, "dataset")


def list_datasets_page(db: Database, owner: str | None, after: int | None, limit: int
                       ) -> tuple[list[UploadedDataset], int]:
    """At most `limit` of `owner`'s datasets (None: every owner's) in id order, with ids
    above the cursor `after` when given, and the count of all of them."""
    with db.session() as s:
        q = select(UploadedDataset).order_by(UploadedDataset.id)
        n = select(func.count()).select_from(UploadedDataset)
        if owner is not None:
            q = q.where(UploadedDataset.owner == owner)
            n = n.where(UploadedDataset.owner == owner)
        if after is not None:
            q = q.where(UploadedDataset.id > after)
        return list(s.scalars(q.limit(limit))), int(s.scalar(n) or 0)


def dataset_exists(session: Any, dataset_id: int) -> bool:
    """Whether the dataset is stored (read in the caller's session, e.g. under a lock)."""
    return session.scalar(select(UploadedDataset.id)
                          .where(UploadedDataset.id == dataset_id)) is not None


def delete_dataset(db: Database, owner: str | None, dataset_id: int) -> None:
    """Delete an uploaded dataset (`owner` None: any owner's), unless an active job uses it.

    Only its owner's jobs can name it (job_checks.check_spec looks datasets up owner-scoped), so
    the check and the delete hold that owner's lock: a job submitted meanwhile either counts
    here or, once the dataset is gone, is refused at submission.
    """
    ds_owner = get_dataset(db, owner, dataset_id).owner
    with db.owner_session(ds_owner) as s:
        active = s.execute(select(Job.id, Job.spec)
                           .where(Job.owner == ds_owner, Job.status.in_(ACTIVE))).all()
        using = [job_id for job_id, spec in active
                 if isinstance(spec, dict) and type(spec.get("dataset")) is int
                 and spec["dataset"] == dataset_id]
        if using:
            raise Conflict(f"dataset {dataset_id} is used by active job(s) "
                           f"{', '.join(map(str, sorted(using)))}; cancel them or let them "
                           f"finish first")
        deleted = s.execute(delete(UploadedDataset)
                            .where(UploadedDataset.id == dataset_id)).rowcount
    if not deleted:
        raise NotFound(f"no dataset {dataset_id}")


def dataset_public(row: UploadedDataset) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "owner": row.owner, "filename": row.filename,
        "format": row.format, "target": row.target, "task": row.task, "n_rows": row.n_rows,
        "n_features": row.n_features, "n_classes": row.n_classes, "sha256": row.sha256,
        "size_bytes": row.size_bytes, "created_at": as_utc(row.created_at),
    }


# Split datasets by (content hash, seed): every trial of a job reuses the same arrays.
_CACHE: dict[tuple[str, int], Any] = {}
_CACHE_MAX = 8


def load_job_dataset(db: Database, spec: JobSpec):
    """The trainer Dataset a job trains on: bundled by name, or uploaded by id (cached by hash)."""
    if isinstance(spec.dataset, str):
        return bundled(spec.dataset, spec.seed)

    def fetch_meta() -> tuple[str, str]:
        with db.session() as s:
            row = s.execute(select(UploadedDataset.sha256, UploadedDataset.task)
                            .where(UploadedDataset.id == spec.dataset)).first()
        if row is None:
            raise NotFound(f"no dataset {spec.dataset}")
        return row.sha256, row.task

    sha, task = DB_RETRY(fetch_meta)
    key = (sha, spec.seed)
    if key not in _CACHE:
        def fetch_content() -> bytes:
            with db.session() as s:
                return s.scalar(select(UploadedDataset.content)
                                .where(UploadedDataset.id == spec.dataset))
        with np.load(io.BytesIO(DB_RETRY(fetch_content)), allow_pickle=False) as npz:
            data = from_arrays(npz["X"], npz["y"], seed=spec.seed,
                               name=f"upload-{spec.dataset}", task=task)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = data
    return _CACHE[key]
