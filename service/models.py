"""ORM models of the service's own tables (Optuna's tables are Optuna's)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.status import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands back naive ones, written in UTC)."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "hptune_api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    # SHA-256 of the secret; the secret itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The start of key_hash ("#1a2b3c4d", keys.fingerprint), so people can tell their keys
    # apart in listings; no character of the secret is stored.
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "hptune_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    n_trials: Mapped[int] = mapped_column(Integer)
    # Trial slots handed to workers; a worker's claim increments it only while below n_trials.
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    # Every claim ever made, never decremented: seeds each trial's sampler differently.
    claims: Mapped[int] = mapped_column(Integer, default=0)
    study_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Artifact(Base):
    """A trial's checkpoint or tuned model (service/artifacts.py); its bytes are `body` in
    the database store, or a file of Optuna's FileSystemArtifactStore named by `id`."""

    __tablename__ = "hptune_artifacts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # checkpoint | model
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


# Trial duration histogram buckets (seconds) of /metrics, and their job_stats columns.
DURATION_BUCKETS_S = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BUCKET_COLUMNS = tuple(f"le_{str(b).replace('.', '_')}s" for b in DURATION_BUCKETS_S)

# An ended job's trials summed once for /metrics (service/metrics.py): valid while the job's
# finished_at is this row's (an extended or resumed job ends again with another).
job_stats = Table(
    "hptune_job_stats", Base.metadata,
    Column("job_id", Integer, primary_key=True),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("complete", Integer, nullable=False),
    Column("pruned", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("durations", Integer, nullable=False),
    Column("duration_sum", Float, nullable=False),
    *(Column(name, Integer, nullable=False) for name in BUCKET_COLUMNS),
    Column("saved_pruned", Float, nullable=False),
    Column("saved_early_stopped", Float, nullable=False),
)


class UploadedDataset(Base):
    __tablename__ = "hptune_datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(8))
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # multiclass | binary | regression, inferred from the target at upload.
    task: Mapped[str] = mapped_column(String(16))
    n_rows: Mapped[int] = mapped_column(Integer)
    n_features: Mapped[int] = mapped_column(Integer)
    n_classes: Mapped[int] = mapped_column(Integer)
    features: Mapped[list[str]] = mapped_column(JSON)
    # Hash of `content`: workers on every machine cache the parsed arrays under it.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    # The checked arrays as a compressed NPZ (X float32, y int64 or float32). Deferred: a
    # listing or a lookup of an owner's datasets (up to their byte quota) reads only this
    # column's neighbours; workers select it by itself.
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerRow(Base):
    __tablename__ = "hptune_workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    # idle | busy | stopped
    state: Mapped[str] = mapped_column(String(16), default="idle")
    trials_run: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DashboardSession(Base):
    """A browser's login to the dashboard: the cookie holds the id, the table only its hash."""

    __tablename__ = "hptune_dashboard_sessions"

    # SHA-256 of the session id; the id itself lives only in the browser's cookie.
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The key that logged in: revoking it ends the session at the next request.
    key_id: Mapped[int] = mapped_column(Integer, ForeignKey("hptune_api_keys.id"), index=True)
    owner: Mapped[str] = mapped_column(String(100))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class IdempotencyKey(Base):
    """A client's Idempotency-Key on a creating POST and what that request answered.

    One row per (owner, key): a retry with the key gets the stored answer instead of a second
    job or dataset (service/idempotency.py).
    """

    __tablename__ = "hptune_idempotency_keys"
    __table_args__ = (UniqueConstraint("owner", "key", name="uq_hptune_idempotency_owner_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the request's canonical form: the same key with another request is a 422.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # pending (a request holds it) | done (response_* hold the answer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # The holding request's random token: only its holder may record what it created.
    attempt: Mapped[str] = mapped_column(String(32))
    # When the holder took the key; after idempotency.LEASE_S another request may take over.
    locked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The job or dataset id, written in the transaction that inserts it.
    resource_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
