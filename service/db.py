"""Engines, sessions and locks for one database URL, built to ride out outages; Optuna's
storage on it comes from service/trial_store.py, retries from service/retry.py."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.pg_locks import LOCK_TIMEOUT_MS, take_xact_lock
from service.retry import DB_RETRY, is_connection_error, is_transient, unavailable
from service.settings import Settings
from service.trial_store import ResilientRDBStorage

log = logging.getLogger("hptune.db")

# SQLite waits this long for a competing writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
# SQLite connections a process keeps (made when used): as many as the API's 40 worker threads
# use at once. Past SQLAlchemy's default of 5, each was opened and closed again per request.
SQLITE_POOL_SIZE = 40
# Seconds a process that serves requests (the API, the CLI) retries a storage call before it
# answers 503; workers ride out longer outages (Settings.db_retry_seconds).
API_RETRY_SECONDS = 2.0
# A new PostgreSQL connection gives up after this long (an outage must fail fast, not hang).
PG_CONNECT_TIMEOUT_S = 5
# Longest wait for another process's hold on a job's claim lock.
PG_LOCK_TIMEOUT_MS = LOCK_TIMEOUT_MS
# Names hptune's locks among PostgreSQL advisory locks (two-key form: class, key): a job's
# claim lock (key: the job id) and an owner's submission lock (key: a hash of the owner).
PG_JOB_LOCK_CLASS = 0x6870  # "hp"
PG_OWNER_LOCK_CLASS = 0x6871

# Heartbeats and stale-trial retries are marked experimental in Optuna; hptune relies on them
# knowingly, so the warning would only be noise in every worker's log.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def engine_kwargs(settings: Settings, application_name: str | None = None) -> dict[str, Any]:
    """Engine options shared by the service's engine and Optuna's."""
    if settings.is_sqlite:
        kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S,
                                                   "check_same_thread": False}}
        if make_url(settings.database_url).database not in (None, "", ":memory:"):
            kwargs.update(pool_size=SQLITE_POOL_SIZE, max_overflow=10)
        return kwargs
    connect_args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    if application_name and settings.database_url.startswith("postgresql"):
        # Shows in pg_stat_activity, so operators can count each process's connections.
        connect_args["application_name"] = application_name[:63]
    if settings.database_pooler == "transaction":
        # psycopg prepares a statement after 5 runs, on one server connection; behind a
        # transaction pooler the next run may land on another (PgBouncer < 1.21: "prepared
        # statement does not exist"). Every engine of the process, Optuna's too, goes here.
        connect_args["prepare_threshold"] = None
    return {
        # A pooled connection that died in an outage is replaced on checkout, not handed out.
        "pool_pre_ping": True,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_recycle": 1800,
        "pool_timeout": 30,
        "connect_args": connect_args,
    }


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Every SQLite connection of the process, Optuna's included, from its first one."""
    if not isinstance(dbapi_conn, sqlite3.Connection):
        return
    cur = dbapi_conn.cursor()
    # The busy timeout first: switching to WAL itself may wait for another process.
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    # WAL lets readers proceed while one writer writes; NORMAL sync is safe under WAL.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(settings: Settings, application_name: str | None = None) -> Engine:
    """The service's engine, with SQLite put in WAL mode on every connection (by
    _sqlite_pragmas, which listens on every engine: listening on this one too ran the
    pragmas twice per connection)."""
    return create_engine(settings.database_url, **engine_kwargs(settings, application_name))


class _FileLock:
    """An exclusive flock on one file, shared by the threads of a process through a mutex."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._fh: Any = None

    def acquire(self) -> None:
        self._mutex.acquire()
        try:
            fh = open(self.path, "a")  # noqa: SIM115 (held open while the lock is held)
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._fh = fh
        except BaseException:
            self._mutex.release()
            raise

    def release(self) -> None:
        fh, self._fh = self._fh, None
        try:
            if fh is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
        finally:
            self._mutex.release()


class JobLock:
    """Mutual exclusion on one job across threads, processes and machines; re-entrant per thread.

    Held while a worker counts a job's trials and asks Optuna for one more, and while a failed
    trial's retry is queued, so that no two of these ever interleave: that is what keeps a
    job at exactly n_trials. PostgreSQL: a transaction-scoped advisory lock on a connection of
    its own (released by the server if the holder dies). SQLite: an flock on a file beside the
    database (every SQLite user is on one machine; the kernel releases it if the holder dies).
    `release()` may be called more than once.
    """

    def __init__(self, db: Database, job_id: int) -> None:
        self._db = db
        self.job_id = job_id
        self._held = False
        self._conn: Connection | None = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        db = self._db
        rlock = db._job_rlock(self.job_id)
        rlock.acquire()
        depth = db._lock_depth()
        try:
            if depth.get(self.job_id, 0) == 0:
                self._acquire_outer()
        except BaseException:
            rlock.release()
            raise
        depth[self.job_id] = depth.get(self.job_id, 0) + 1
        self._held = True

    def _acquire_outer(self) -> None:
        db = self._db
        if db.settings.is_sqlite:
            db._sqlite_job_lock.acquire()
            return
        conn = db.engine.connect()
        try:
            conn.begin()
            _pg_xact_lock(db, lambda: conn, conn.rollback, PG_JOB_LOCK_CLASS, self.job_id)
        except BaseException as exc:
            _close_quietly(conn)
            if isinstance(exc, SQLAlchemyError) and is_transient(exc):
                db.note_outage()
                raise unavailable(exc) from exc
            raise
        self._conn = conn

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        db = self._db
        depth = db._lock_depth()
        depth[self.job_id] -= 1
        try:
            if depth[self.job_id] == 0:
                del depth[self.job_id]
                if db.settings.is_sqlite:
                    db._sqlite_job_lock.release()
                else:
                    conn, self._conn = self._conn, None
                    if conn is not None:
                        _close_quietly(conn)
        finally:
            db._job_rlock(self.job_id).release()


def _pg_xact_lock(db: Database, connection: Callable[[], Connection],
                  rollback: Callable[[], None], lock_class: int, key: int) -> None:
    """Take an advisory lock held until the connection's transaction ends, waiting at most
    PG_LOCK_TIMEOUT_MS; polled behind a transaction pooler (service/pg_locks.py)."""
    take_xact_lock(connection, rollback, (lock_class, key), what=f"lock {lock_class}/{key}",
                   poll=db.settings.database_pooler == "transaction")


def _owner_lock_key(owner: str) -> int:
    """The owner's 32-bit advisory lock key (a collision only makes two owners take turns)."""
    digest = hashlib.blake2b(owner.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _close_quietly(conn: Connection) -> None:
    """End the connection's transaction (releasing its advisory locks) and give it back."""
    try:
        conn.rollback()
        conn.close()
    except Exception:
        with contextlib.suppress(Exception):
            conn.invalidate()
            conn.close()


class Database:
    """One process's handle on the database: an engine, sessions, job locks, Optuna's storage.

    `role` names the process in PostgreSQL's pg_stat_activity (`hptune-<role>-<pid>`);
    `retry_seconds` is how long Optuna storage calls ride out an outage before failing.
    """

    def __init__(self, settings: Settings, stale_trial_callback: Callable[..., None] | None = None,
                 *, role: str = "api", retry_seconds: float = API_RETRY_SECONDS) -> None:
        """`stale_trial_callback(db, study, trial)` runs for each trial failed by heartbeat."""
        self.settings = settings
        self.role = role
        self.retry_seconds = retry_seconds
        self.application_name = f"hptune-{role}-{os.getpid()}"
        self.engine = make_engine(settings, self.application_name)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._stale_trial_callback = stale_trial_callback
        self._storage: ResilientRDBStorage | None = None
        self._storage_mutex = threading.Lock()
        # monotonic() of the last error that looked like an outage (0: none seen).
        self.last_outage = 0.0
        self._rlocks: dict[int, threading.RLock] = {}
        self._rlocks_mutex = threading.Lock()
        self._thread_state = threading.local()
        path = self.sqlite_path
        self._sqlite_job_lock = _FileLock(f"{path}.jobs.lock") if path else _NullLock()
        self._sqlite_owner_lock = _FileLock(f"{path}.owners.lock") if path else _NullLock()
        self._sqlite_state_lock = _FileLock(f"{path}.state.lock") if path else None

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite database file, or None (PostgreSQL, or an in-memory database)."""
        if not self.settings.is_sqlite:
            return None
        path = make_url(self.settings.database_url).database
        return None if not path or path == ":memory:" else path

    def note_outage(self) -> None:
        self.last_outage = time.monotonic()

    def seconds_since_outage(self) -> float:
        return time.monotonic() - self.last_outage if self.last_outage else float("inf")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on error, and maps outages to 503."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (OperationalError, DBAPIError) as exc:
            _rollback_quietly(session)
            if exc.connection_invalidated or is_connection_error(exc):
                self.note_outage()
                raise unavailable(exc) from exc
            raise
        except BaseException:
            _rollback_quietly(session)
            raise
        finally:
            session.close()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A Core connection for a read, outages mapped to 503 as session() maps them: an ORM
        Session costs a hot read on SQLite more than its query does (~70 µs)."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if exc.connection_invalidated or is_connection_error(exc):
                self.note_outage()
                raise unavailable(exc) from exc
            raise

    @contextmanager
    def owner_session(self, owner: str) -> Iterator[Session]:
        """A session that holds the owner's lock until it has committed or rolled back.

        What it reads and writes is atomic per owner across threads, processes and machines:
        counting an owner's jobs against a quota, then adding one. The same mechanisms as the
        job lock, scoped to the session's transaction. PostgreSQL: the owner's advisory lock
        taken in that transaction, so its commit releases the lock and no second connection
        is held (API threads each holding two pool connections could starve the pool).
        SQLite: an flock on a file beside the database (one for all owners: SQLite takes its
        writers one at a time anyway), released after the commit.
        """
        self._sqlite_owner_lock.acquire()
        try:
            with self.session() as s:
                if not self.settings.is_sqlite:
                    _pg_xact_lock(self, s.connection, s.rollback, PG_OWNER_LOCK_CLASS,
                                  _owner_lock_key(owner))
                yield s
        finally:
            self._sqlite_owner_lock.release()

    def job_lock(self, job_id: int) -> JobLock:
        """The job's claim lock (not yet acquired); use `with` or acquire()/release()."""
        return JobLock(self, job_id)

    def _job_rlock(self, job_id: int) -> threading.RLock:
        with self._rlocks_mutex:
            return self._rlocks.setdefault(job_id, threading.RLock())

    def _lock_depth(self) -> dict[int, int]:
        depth = getattr(self._thread_state, "depth", None)
        if depth is None:
            depth = self._thread_state.depth = {}
        return depth

    @property
    def storage(self) -> ResilientRDBStorage:
        """Optuna's storage on the same database, with heartbeats on running trials."""
        with self._storage_mutex:
            if self._storage is None:
                self._storage = DB_RETRY(self._make_storage)
        return self._storage

    def _make_storage(self) -> ResilientRDBStorage:
        storage = ResilientRDBStorage(
            self.settings.database_url,
            retry_seconds=self.retry_seconds,
            on_outage=self.note_outage,
            state_lock=self._sqlite_state_lock,
            engine_kwargs=engine_kwargs(self.settings, self.application_name),
            heartbeat_interval=self.settings.heartbeat_interval,
            grace_period=self.settings.grace_period,
            heartbeat_stale_trial_callback=(
                functools.partial(self._stale_trial_callback, self)
                if self._stale_trial_callback else None
            ),
        )
        return storage  # _sqlite_pragmas already listens on its engine, as on every one

    def release_idle_connections(self) -> None:
        """Close pooled connections no one is using (an idle worker keeps none it doesn't need)."""
        self.engine.dispose()
        if self._storage is not None:
            self._storage.engine.dispose()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._storage is not None:
            self._storage.engine.dispose()


class _NullLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def _rollback_quietly(session: Session) -> None:
    # The connection may be gone; closing the session then returns nothing to the pool.
    with contextlib.suppress(Exception):
        session.rollback()
