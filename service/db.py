"""Engines, sessions and Optuna storage for one database URL."""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import optuna
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import DatabaseUnavailable
from service.settings import Settings

# SQLite waits this long for a competing writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
# Bounded retries for transient database errors (locks, deadlocks, dropped connections).
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY_S = 0.05

T = TypeVar("T")


def engine_kwargs(settings: Settings) -> dict[str, Any]:
    """Engine options shared by the service's engine and Optuna's."""
    if settings.is_sqlite:
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    return {
        "pool_pre_ping": True,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_recycle": 1800,
    }


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers proceed while one writer writes; NORMAL sync is safe under WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.close()


def make_engine(settings: Settings) -> Engine:
    """The service's engine, with SQLite put in WAL mode on every connection."""
    engine = create_engine(settings.database_url, **engine_kwargs(settings))
    if settings.is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Database:
    """One process's handle on the database: an engine, sessions and Optuna's storage."""

    def __init__(self, settings: Settings, stale_trial_callback: Callable[..., None] | None = None
                 ) -> None:
        """`stale_trial_callback(db, study, trial)` runs for each trial failed by heartbeat."""
        self.settings = settings
        self.engine = make_engine(settings)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._stale_trial_callback = stale_trial_callback
        self._storage: optuna.storages.RDBStorage | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on error, and maps outages to 503."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (OperationalError, DBAPIError) as exc:
            session.rollback()
            if exc.connection_invalidated or _is_connection_error(exc):
                raise DatabaseUnavailable(str(exc.orig)[:200]) from exc
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """Optuna's storage on the same database, with heartbeats on running trials."""
        if self._storage is None:
            self._storage = retrying(lambda: optuna.storages.RDBStorage(
                self.settings.database_url,
                engine_kwargs=engine_kwargs(self.settings),
                heartbeat_interval=self.settings.heartbeat_interval,
                grace_period=self.settings.grace_period,
                heartbeat_stale_trial_callback=(
                    functools.partial(self._stale_trial_callback, self)
                    if self._stale_trial_callback else None
                ),
            ))
            if self.settings.is_sqlite:
                event.listen(self._storage.engine, "connect", _sqlite_pragmas)
        return self._storage

    def dispose(self) -> None:
        self.engine.dispose()
        if self._storage is not None:
            self._storage.engine.dispose()


def _is_connection_error(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return any(s in text for s in ("connection", "server closed", "terminating", "refused"))


def _is_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in (
        "database is locked", "deadlock", "could not serialize", "connection", "server closed",
        "terminating", "refused", "ssl syscall",
    ))


def retrying(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Call `fn`, retrying transient database errors with exponential backoff and jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except (OperationalError, DBAPIError, DatabaseUnavailable) as exc:
            if attempt == attempts - 1 or not (
                isinstance(exc, DatabaseUnavailable) or _is_transient(exc)
            ):
                raise
            delay = RETRY_BASE_DELAY_S * (2**attempt)
            time.sleep(delay + random.uniform(0, delay))
    raise AssertionError("unreachable")


def retry(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of `retrying`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return retrying(lambda: fn(*args, **kwargs))

    return wrapper
