"""One Settings object, read from the environment (prefix HPTUNE_), validated at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_database_url() -> str:
    return f"sqlite:///{Path.cwd() / 'hptune.db'}"


class Settings(BaseSettings):
    """Service configuration; every field is `HPTUNE_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HPTUNE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    # Any SQLAlchemy URL; holds both the service's and Optuna's tables.
    database_url: str = Field(default_factory=_default_database_url)
    # Optuna heartbeats on running trials (seconds): a trial whose worker is silent for
    # grace_period is failed and retried.
    heartbeat_interval: int = Field(default=5, ge=1)
    grace_period: int = Field(default=20, ge=2)
    # A reaper fails at once, without waiting for grace_period, a trial whose worker process
    # it can see is gone (same host and PID namespace; see service/procs.py).
    reap_gone_processes: bool = True
    # Seconds between reaper rounds, in the API process (even while no worker lives) and in
    # every worker (between trials, or while idle).
    reap_interval: float = Field(default=5.0, gt=0, le=3600)
    # Times a crashed trial's parameters are retried before the slot goes to a new sample.
    max_trial_retries: int = Field(default=2, ge=0)
    # Seconds an idle worker waits between looks for work.
    poll_interval: float = Field(default=0.5, gt=0)
    # SQLAlchemy pool per process (PostgreSQL; SQLite uses its own defaults).
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=5, ge=0)
    # "transaction" when HPTUNE_DATABASE_URL goes through a transaction pooler (PgBouncer's
    # pool_mode = transaction): no prepared statements, and lock waits that poll instead of
    # holding one of the pooler's server connections while they wait (service/pg_locks.py).
    database_pooler: Literal["none", "transaction"] = "none"
    # Seconds a worker keeps retrying a database call through an outage before it gives the
    # call up (a trial whose result cannot be stored is then failed and retried by the reaper).
    db_retry_seconds: float = Field(default=60.0, ge=0)
    # Seconds a worker has after SIGTERM to finish its epoch and hand its trial back before it
    # exits anyway (the trial is then failed by its heartbeat and retried).
    stop_timeout: float = Field(default=25.0, gt=0)
    # Fault injection for tests only (service.faults): "NAME=VALUE" makes a worker hard-exit
    # (os._exit(86)) after the first epoch of every trial whose parameter NAME equals VALUE.
    test_crash_on_param: str | None = None
    # Fault injection for tests only: the API process hard-exits (os._exit(1)) at this step
    # of job creation (service.jobs._crash_point), to show that half-created jobs are repaired.
    test_crash_in_create: Literal["before_row", "after_row", "after_study",
                                  "after_create_study"] | None = None
    # Seconds a queued job may stay without its study before the reaper takes it for the
    # remains of a crashed creation and finishes creating it (reaper.repair_half_created).
    creation_grace_seconds: float = Field(default=30.0, gt=0)
    # Bounds that job specs must respect.
    max_trials_per_job: int = Field(default=10_000, ge=1)
    max_epochs_per_trial: int = Field(default=1_000, ge=1)
    max_timeout_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    # The timeout of a job whose spec gives none (capped by max_timeout_seconds); it is
    # written into the job's stored spec, so the job and its report show it.
    default_timeout_seconds: float = Field(default=24 * 3600, gt=0, le=7 * 24 * 3600)
    # Peak bytes one trial may allocate, estimated from the spec and the dataset's shape at
    # submission (trainer.memory): a larger model or batch is refused with a 422.
    max_trial_bytes: int = Field(default=2 << 30, ge=1 << 20)
    # Per-owner quotas, counted in the database so they hold across API processes.
    max_active_jobs_per_owner: int = Field(default=20, ge=1)
    max_queued_trials_per_owner: int = Field(default=5_000, ge=1)
    # Request size limits (bytes): JSON bodies, and dataset uploads. An NPZ upload's arrays
    # must also fit max_upload_bytes unpacked (checked from their headers before unpacking).
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    max_upload_bytes: int = Field(default=20 << 20, ge=1024)
    # Bytes that parsing, checking and storing one upload may allocate, estimated before the
    # work starts from the CSV's header width and line count or the NPZ's array headers
    # (service.uploads.memory_estimate); a larger estimate is refused with a 422.
    max_parse_bytes: int = Field(default=256 << 20, ge=1 << 20)
    # Per-owner dataset quotas (count, and the stored size_bytes summed), counted in the
    # database under the owner's lock, so they hold across API processes; over them, 429.
    max_datasets_per_owner: int = Field(default=50, ge=1)
    max_dataset_bytes_per_owner: int = Field(default=1 << 30, ge=1024)
    # Seconds a request body may stall between two chunks before the request answers 408.
    body_idle_timeout_seconds: float = Field(default=15.0, gt=0)
    # Event streams one owner may hold open at once in one API process (each polls the
    # database every second); the next answers 429.
    max_streams_per_owner: int = Field(default=4, ge=1)
    # Reports and plots one owner may have rendering at once in one API process.
    max_renders_per_owner: int = Field(default=2, ge=1)
    # Seconds an API process takes a verified API key on trust before it looks the key up
    # again (service.keys.VerifiedKeys): the most a revoked key goes on working. 0: every
    # request looks its key up.
    key_cache_seconds: float = Field(default=1.0, ge=0, le=60)
    # Seconds a dashboard login lasts (the session's expiry and its cookie's Max-Age).
    dashboard_session_seconds: int = Field(default=8 * 3600, ge=60)
    # Seconds an Idempotency-Key of POST /jobs or /datasets is remembered (per owner): a retry
    # within them gets the first answer (service/idempotency.py). At most 30 days.
    idempotency_seconds: int = Field(default=24 * 3600, ge=1, le=30 * 24 * 3600)
    # Where trial checkpoints and tuned models go (service/artifacts.py): "database" (the
    # service's own database: workers on many machines need nothing more), a directory
    # (Optuna's FileSystemArtifactStore; every worker and API process must see it), or
    # "s3://<bucket>" (Optuna's Boto3ArtifactStore; the `s3` extra).
    artifact_store: str = "database"
    # Models kept per job: those of its best this-many trials (the rest are deleted).
    keep_models: int = Field(default=3, ge=1, le=100)
    # Bytes of checkpoints and models one owner may keep; past it, new ones are not stored.
    max_artifact_bytes_per_owner: int = Field(default=1 << 30, ge=1 << 20)

    @model_validator(mode="after")
    def _safe_for_production(self) -> Settings:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError("HPTUNE_GRACE_PERIOD must be greater than HPTUNE_HEARTBEAT_INTERVAL")
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("HPTUNE_DATABASE_URL must be PostgreSQL when environment=production")
        if self.database_pooler != "none" and self.is_sqlite:
            raise ValueError("HPTUNE_DATABASE_POOLER is for PostgreSQL URLs, not SQLite")
        if self.pool_size + self.max_overflow < 2:
            # A worker holds a job's claim lock on one connection while it counts on another.
            raise ValueError("HPTUNE_POOL_SIZE + HPTUNE_MAX_OVERFLOW must be at least 2")
        if self.environment == "production" and self.test_crash_on_param:
            raise ValueError("HPTUNE_TEST_CRASH_ON_PARAM is for tests; unset it in production")
        if self.environment == "production" and self.test_crash_in_create:
            raise ValueError("HPTUNE_TEST_CRASH_IN_CREATE is for tests; unset it in production")
        if self.artifact_store.startswith("s3://"):
            import importlib.util

            if not self.artifact_store.removeprefix("s3://").strip("/"):
                raise ValueError("HPTUNE_ARTIFACT_STORE=s3:// needs a bucket: s3://<bucket>")
            if importlib.util.find_spec("boto3") is None:
                raise ValueError("HPTUNE_ARTIFACT_STORE=s3://... needs boto3: "
                                 "pip install 'hptune[s3]'")
        if self.test_crash_on_param is not None and "=" not in self.test_crash_on_param:
            raise ValueError("HPTUNE_TEST_CRASH_ON_PARAM must look like NAME=VALUE")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
