"""Uploaded datasets: parsed and checked at upload, stored in the database, cached by workers."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import zipfile
from typing import Any

import numpy as np
from sqlalchemy import select

from search import JobSpec
from search.datasets import bundled, from_arrays
from search.spec import control_character
from service.db import Database, retrying
from service.errors import InvalidSpec, NotFound, TooLarge
from service.models import UploadedDataset, as_utc

# Targets with at most this many distinct integer values are classes, not a regression target.
MAX_CLASSES = 50


def _fail(message: str, field: str = "file") -> InvalidSpec:
    return InvalidSpec(message, field=field)


def parse_csv(raw: bytes, target: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Numeric feature matrix, target vector and feature names of a CSV with a header row.

    Every problem is reported with its row (1-based, the header is row 1) and column.
    """
    if not raw.strip():
        raise _fail("file is empty")
    if b"\x00" in raw:
        raise _fail(f"file contains a NUL byte at byte {raw.index(0)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(f"file is not UTF-8 (invalid byte at position {exc.start})") from None
    if not target:
        raise _fail("target is required for a CSV upload: the name of the target column",
                    field="target")
    rows = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(rows)]
    except StopIteration:
        raise _fail("file has no header row") from None
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise _fail(f"row 1: column name {dup!r} appears twice")
    if target not in header:
        raise _fail(f"target column {target!r} is not in the header ({', '.join(header[:20])})",
                    field="target")
    t_idx = header.index(target)
    width = len(header)
    values: list[list[float]] = []
    for line_no, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            raise _fail(f"row {line_no}: {len(row)} fields, expected {width} as in the header")
        parsed = []
        for col, cell in zip(header, row, strict=True):
            try:
                v = float(cell)
            except ValueError:
                shown = cell if len(cell) <= 30 else cell[:30] + "..."
                raise _fail(f"row {line_no}, column {col!r}: {shown!r} is not a number") from None
            if not math.isfinite(v):
                raise _fail(f"row {line_no}, column {col!r}: NaN or infinity is not allowed")
            parsed.append(v)
        values.append(parsed)
    if not values:
        raise _fail("file has a header but no data rows")
    table = np.asarray(values, dtype=np.float64)
    y = table[:, t_idx]
    X = np.delete(table, t_idx, axis=1)
    if X.shape[1] == 0:
        raise _fail("file has no feature columns besides the target")
    return X, y, [h for i, h in enumerate(header) if i != t_idx]


def parse_npz(raw: bytes, max_bytes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Arrays `X` (rows, features) and `y` (rows,) of an NPZ file, without unpickling.

    Each array's size is read from its zip entry and its .npy header before anything is
    unpacked: together they may take at most `max_bytes`, so neither a header that claims a
    huge shape nor a small file that inflates to gigabytes makes the server allocate them.
    """
    if not raw:
        raise _fail("file is empty")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            entries = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
            missing = [k for k in ("X", "y") if k not in entries]
            if missing:
                raise _fail(f"NPZ lacks array(s) {', '.join(missing)}; it has {sorted(entries)}")
            X = _read_npy(zf, entries["X"], "X", max_bytes)
            y = _read_npy(zf, entries["y"], "y", max_bytes - X.nbytes)
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as exc:
        raise _fail(f"not a readable NPZ file: {exc}") from None
    except MemoryError:
        raise TooLarge("NPZ arrays too large to unpack", field="file") from None
    if X.ndim != 2:
        raise _fail(f"X must be 2-D (rows, features), got shape {list(X.shape)}")
    if y.ndim != 1:
        raise _fail(f"y must be 1-D, got shape {list(y.shape)}")
    if len(X) != len(y):
        raise _fail(f"X has {len(X)} rows but y has {len(y)}")
    if X.shape[1] == 0:
        raise _fail("X has no feature columns")
    X, y = X.astype(np.float64), y.astype(np.float64)
    bad = np.argwhere(~np.isfinite(X))
    if len(bad):
        r, c = bad[0]
        raise _fail(f"X row {r}, column {c}: NaN or infinity is not allowed")
    bad_y = np.flatnonzero(~np.isfinite(y))
    if len(bad_y):
        raise _fail(f"y row {bad_y[0]}: NaN or infinity is not allowed")
    return X, y, [f"x{i}" for i in range(X.shape[1])]


def _read_npy(zf: zipfile.ZipFile, entry: zipfile.ZipInfo, name: str, max_bytes: int
              ) -> np.ndarray:
    """One array of the NPZ, refused from its sizes and header before it is unpacked."""
    if entry.file_size > max_bytes:
        raise TooLarge(f"array {name} unpacks to {entry.file_size} bytes, more than the "
                       f"{max_bytes} bytes left of the upload limit", field="file")
    with zf.open(entry) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise _fail(f"array {name}: unsupported .npy format version {version}")
    if not np.issubdtype(dtype, np.number) or dtype.kind == "c":
        raise _fail(f"{name} must be real numbers, got dtype {dtype}")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > max_bytes:
        raise TooLarge(f"array {name} has shape {list(shape)}: {claimed} bytes, more than the "
                       f"{max_bytes} bytes left of the upload limit", field="file")
    with zf.open(entry) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def infer_task(y: np.ndarray) -> str:
    """multiclass/binary for few integer-valued targets, regression otherwise."""
    distinct = np.unique(y)
    if np.all(distinct == np.round(distinct)) and len(distinct) <= MAX_CLASSES:
        return "binary" if len(distinct) == 2 else "multiclass"
    return "regression"


def validate_arrays(X: np.ndarray, y: np.ndarray, task: str) -> None:
    """Refuse data the trainer cannot split or learn from, naming the problem."""
    if task != "regression" and len(np.unique(y)) < 2:
        raise _fail(f"the target has a single class ({y[0]:g}); classification needs two",
                    field="target")
    if task == "multiclass" and len(np.unique(y)) == 1:
        raise _fail("the target has a single class", field="target")
    try:
        from_arrays(X.astype(np.float32), y if task != "regression" else y.astype(np.float32),
                    seed=0, name="check", task=task)
    except ValueError as exc:
        raise _fail(f"dataset cannot be split for training: {exc}") from None


def create_dataset(db: Database, owner: str, filename: str, raw: bytes, target: str | None,
                   name: str | None) -> UploadedDataset:
    """Parse, check and store an upload; answers with the stored row."""
    for field, label, text in (("file", "the file name", filename), ("name", "name", name)):
        bad = control_character(text or "")
        if bad is not None:
            raise _fail(f"{label} must not contain control characters (found {bad})", field)
    is_npz = filename.lower().endswith(".npz") or raw[:4] == b"PK\x03\x04"
    limit = db.settings.max_upload_bytes
    X, y, features = parse_npz(raw, limit) if is_npz else parse_csv(raw, target)
    task = infer_task(y)
    validate_arrays(X, y, task)
    buf = io.BytesIO()
    np.savez_compressed(buf, X=X.astype(np.float32),
                        y=y.astype(np.int64) if task != "regression" else y.astype(np.float32))
    content = buf.getvalue()
    row = UploadedDataset(
        owner=owner, name=(name or filename or "upload")[:200], filename=filename[:200],
        format="npz" if is_npz else "csv", target=target if not is_npz else None,
        task=task, n_rows=len(X), n_features=int(X.shape[1]),
        n_classes=len(np.unique(y)) if task != "regression" else 1,
        features=features[:1000], sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content), content=content,
    )
    with db.session() as s:
        s.add(row)
        s.flush()
        s.expunge(row)
    return row


def get_dataset(db: Database, owner: str | None, dataset_id: int) -> UploadedDataset:
    with db.session() as s:
        row = s.get(UploadedDataset, dataset_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"no dataset {dataset_id}")
    return row


def list_datasets(db: Database, owner: str | None) -> list[UploadedDataset]:
    with db.session() as s:
        q = select(UploadedDataset).order_by(UploadedDataset.id)
        if owner is not None:
            q = q.where(UploadedDataset.owner == owner)
        return list(s.scalars(q))


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

    sha, task = retrying(fetch_meta)
    key = (sha, spec.seed)
    if key not in _CACHE:
        def fetch_content() -> bytes:
            with db.session() as s:
                return s.scalar(select(UploadedDataset.content)
                                .where(UploadedDataset.id == spec.dataset))
        with np.load(io.BytesIO(retrying(fetch_content)), allow_pickle=False) as npz:
            data = from_arrays(npz["X"], npz["y"], seed=spec.seed,
                               name=f"upload-{spec.dataset}", task=task)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = data
    return _CACHE[key]
