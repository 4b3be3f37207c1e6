"""Engines, sessions, locks and Optuna storage for one database URL, built to ride out outages."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import optuna
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import DatabaseUnavailable
from service.settings import Settings

log = logging.getLogger("hptune.db")

# SQLite waits this long for a competing writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
# Bounded retries for transient database errors (locks, deadlocks, dropped connections).
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY_S = 0.05
# Longest pause between two retries of one call during an outage.
RETRY_MAX_DELAY_S = 2.0
# Seconds a process that serves requests (the API, the CLI) retries a storage call before it
# answers 503; workers ride out longer outages (Settings.db_retry_seconds).
API_RETRY_SECONDS = 2.0
# A new PostgreSQL connection gives up after this long (an outage must fail fast, not hang).
PG_CONNECT_TIMEOUT_S = 5
# Longest wait for another process's hold on a job's claim lock.
PG_LOCK_TIMEOUT_MS = 30_000
# Names hptune's locks among PostgreSQL advisory locks (two-key form: class, key): a job's
# claim lock (key: the job id) and an owner's submission lock (key: a hash of the owner).
PG_JOB_LOCK_CLASS = 0x6870  # "hp"
PG_OWNER_LOCK_CLASS = 0x6871

# Trial states that hold one of a job's n_trials slots: a job never has more of these than
# n_trials. WAITING (a queued retry) and FAIL do not; a claim pops a WAITING trial first.
SLOT_STATES = ("RUNNING", "COMPLETE", "PRUNED")
SLOT_STATES_SQL = "('RUNNING', 'COMPLETE', 'PRUNED')"

T = TypeVar("T")

# Heartbeats and stale-trial retries are marked experimental in Optuna; hptune relies on them
# knowingly, so the warning would only be noise in every worker's log.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

_TRANSIENT_TEXT = (
    "database is locked", "deadlock", "could not serialize", "connection", "server closed",
    "terminating", "refused", "ssl syscall", "the database system is", "could not connect",
    "timeout expired", "consuming input failed", "no connection", "lock timeout",
    "canceling statement due to lock timeout",
)


def engine_kwargs(settings: Settings, application_name: str | None = None) -> dict[str, Any]:
    """Engine options shared by the service's engine and Optuna's."""
    if settings.is_sqlite:
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
    connect_args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    if application_name and settings.database_url.startswith("postgresql"):
        # Shows in pg_stat_activity, so operators can count each process's connections.
        connect_args["application_name"] = application_name[:63]
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
    """The service's engine, with SQLite put in WAL mode on every connection."""
    engine = create_engine(settings.database_url, **engine_kwargs(settings, application_name))
    if settings.is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        yield cur
        cur = cur.__cause__ or cur.__context__
        seen += 1


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt may not see: locks, deadlocks, lost connections.

    Looks through Optuna's StorageInternalError to the driver error underneath.
    """
    for e in _causes(exc):
        if isinstance(e, DatabaseUnavailable):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, SQLAlchemyError | optuna.exceptions.StorageInternalError) or (
            type(e).__module__.startswith(("psycopg", "sqlite3"))
        ):
            text_ = str(getattr(e, "orig", None) or e).lower()
            if any(s in text_ for s in _TRANSIENT_TEXT):
                return True
    return False


def _is_connection_error(exc: BaseException) -> bool:
    text_ = str(getattr(exc, "orig", None) or exc).lower()
    return any(s in text_ for s in (
        "connection", "server closed", "terminating", "refused", "the database system is",
        "could not connect", "timeout expired", "no connection",
    ))


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    return DatabaseUnavailable(f"database unavailable: {str(orig).strip()[:200]}")


def _backoff(attempt: int, cap_s: float = RETRY_MAX_DELAY_S) -> float:
    delay = min(RETRY_BASE_DELAY_S * (2**attempt), cap_s)
    return delay + random.uniform(0, delay)


def retrying(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Call `fn`, retrying transient database errors with exponential backoff and jitter.

    When the attempts run out on a transient error, raises DatabaseUnavailable (the API
    answers 503), so callers never see a driver traceback for an outage.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError,
                DatabaseUnavailable) as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                if isinstance(exc, DatabaseUnavailable):
                    raise
                raise _unavailable(exc) from exc
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def retry(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of `retrying`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return retrying(lambda: fn(*args, **kwargs))

    return wrapper


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
            _pg_xact_lock(conn, PG_JOB_LOCK_CLASS, self.job_id)
        except BaseException as exc:
            _close_quietly(conn)
            if isinstance(exc, SQLAlchemyError) and is_transient(exc):
                db.note_outage()
                raise _unavailable(exc) from exc
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


def _pg_xact_lock(conn: Connection, lock_class: int, key: int) -> None:
    """Take an advisory lock held until `conn`'s transaction ends, waiting PG_LOCK_TIMEOUT_MS."""
    conn.execute(text(f"SET LOCAL lock_timeout = {PG_LOCK_TIMEOUT_MS}"))
    conn.execute(text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": lock_class, "k": key})


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


# Optuna storage methods that are safe to call again after an error whose outcome is unknown:
# reads, and writes that upsert (Optuna ignores the duplicate key of a repeated insert).
_RETRIED_METHODS = (
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "set_study_user_attr", "set_study_system_attr",
    "get_trial", "get_all_trials", "_get_trials", "_get_best_trial_id", "get_best_trial",
    "get_trial_id_from_study_id_trial_number", "get_trial_param", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_n_trials",
    "set_trial_param", "_set_trial_param", "set_trial_intermediate_value",
    "set_trial_system_attr", "_get_stale_trial_ids",
)


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose calls ride out database outages of up to `retry_seconds`.

    Transient errors (lost connections, locks) are retried with capped exponential backoff
    until `retry_seconds` have passed since the outage began; after that calls fail at once
    (DatabaseUnavailable) until one succeeds again. State changes are retried too: if an
    attempt whose outcome is unknown did commit, the retry finds the trial already in the
    asked-for state and reports success. Trial creation is not retried here (a repeated insert
    would make a second trial); heartbeats are not retried (the next beat is the retry). On
    SQLite, state changes also hold a file lock, because SQLite has no SELECT ... FOR UPDATE
    and Optuna's check-then-set would otherwise let a worker's tell and the reaper's fail both
    win.
    """

    def __init__(self, url: str, *, retry_seconds: float,
                 on_outage: Callable[[], None] = lambda: None,
                 state_lock: _FileLock | None = None, **kwargs: Any) -> None:
        self._retry_seconds = retry_seconds
        self._on_outage = on_outage
        self._state_lock = state_lock
        self._failing_since: float | None = None
        # Trial user attributes not yet written: {trial_id: {key: value_json}}.
        self._pending: dict[int, dict[str, str]] = {}
        self._pending_lock = threading.Lock()
        super().__init__(url, **kwargs)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Buffered: written with the next storage call, all of a trial's in one transaction.

        A finished trial reports a dozen attributes one by one; one statement each (plus a
        commit and a pool ping) made them the largest part of a short trial's database time.
        Every other call of this storage writes the buffer first, so this process never reads
        its own writes out of order; other processes see them at the trial's next report or
        tell at the latest.
        """
        value_json = json.dumps(value)  # fails here, at the caller, if not JSON
        with self._pending_lock:
            self._pending.setdefault(trial_id, {})[key] = value_json

    def _flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        from optuna.storages._rdb import models

        attr = models.TrialUserAttributeModel
        session = self.scoped_session()
        try:
            for trial_id, values in pending.items():
                state = session.execute(select(models.TrialModel.state)
                                        .where(models.TrialModel.trial_id == trial_id)
                                        ).scalar_one_or_none()
                if state is None or state.is_finished():
                    continue  # someone else finished it: its tell will say so
                session.execute(delete(attr).where(attr.trial_id == trial_id,
                                                   attr.key.in_(list(values))))
                session.add_all([attr(trial_id=trial_id, key=k, value_json=v)
                                 for k, v in values.items()])
            session.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                session.rollback()
            with self._pending_lock:  # keep them for the retry, newer values winning
                for trial_id, values in pending.items():
                    self._pending[trial_id] = {**values, **self._pending.get(trial_id, {})}
            raise
        finally:
            session.close()

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        self._call(self._flush)
        return super()._create_new_trial(study_id, template_trial)

    def _call(self, fn: Callable[[], T],
              after_unknown_outcome: Callable[[Exception], T | None] | None = None) -> T:
        attempt = 0
        while True:
            try:
                self._flush()
                result = fn()
            except Exception as exc:
                if attempt > 0 and after_unknown_outcome is not None and not is_transient(exc):
                    settled = after_unknown_outcome(exc)
                    if settled is not None:
                        self._failing_since = None
                        return settled
                if not is_transient(exc):
                    raise
                self._on_outage()
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                left = self._retry_seconds - (now - self._failing_since)
                if left <= 0:
                    raise _unavailable(exc) from exc
                time.sleep(min(_backoff(attempt), left))
                attempt += 1
                continue
            self._failing_since = None
            return result

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState,
                               values: Any = None) -> bool:
        base = super().set_trial_state_values

        def attempt() -> bool:
            if self._state_lock is None:
                return base(trial_id, state=state, values=values)
            self._state_lock.acquire()
            try:
                return base(trial_id, state=state, values=values)
            finally:
                self._state_lock.release()

        def after_unknown_outcome(exc: Exception) -> bool | None:
            # An earlier attempt may have committed: then the trial is already where we wanted.
            if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) and (
                optuna.storages.RDBStorage.get_trial(self, trial_id).state == state
            ):
                return True
            return None

        return self._call(attempt, after_unknown_outcome)


def _retried(name: str) -> Callable[..., Any]:
    base = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(base)
    def method(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(lambda: base(self, *args, **kwargs))

    return method


for _name in _RETRIED_METHODS:
    setattr(ResilientRDBStorage, _name, _retried(_name))


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
            if exc.connection_invalidated or _is_connection_error(exc):
                self.note_outage()
                raise _unavailable(exc) from exc
            raise
        except BaseException:
            _rollback_quietly(session)
            raise
        finally:
            session.close()

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
                    _pg_xact_lock(s.connection(), PG_OWNER_LOCK_CLASS, _owner_lock_key(owner))
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
                self._storage = retrying(self._make_storage)
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
        if self.settings.is_sqlite:
            event.listen(storage.engine, "connect", _sqlite_pragmas)
        return storage

    # --- reads across Optuna's tables (plain SQL on its stable schema, never writes) ---------

    def trial_state_counts(self, study_name: str) -> dict[str, int]:
        """The study's trials by state name (RUNNING, COMPLETE, PRUNED, FAIL, WAITING)."""
        with self.session() as s:
            rows = s.execute(text(
                "SELECT CAST(t.state AS VARCHAR(16)) AS state, COUNT(*) AS n FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :name "
                "GROUP BY t.state"), {"name": study_name}).all()
        return {str(r.state): int(r.n) for r in rows}

    def slots_in_use(self, study_names: list[str]) -> dict[str, int]:
        """For each study, its trials that hold one of the job's slots: RUNNING or finished."""
        if not study_names:
            return {}
        with self.session() as s:
            rows = s.execute(text(
                "SELECT s.study_name AS name, COUNT(t.trial_id) AS n FROM studies s "
                "LEFT JOIN trials t ON t.study_id = s.study_id AND "
                f"CAST(t.state AS VARCHAR(16)) IN {SLOT_STATES_SQL} "
                "WHERE s.study_name IN :names GROUP BY s.study_name"
            ).bindparams(bindparam("names", expanding=True)), {"names": study_names}).all()
        return {str(r.name): int(r.n) for r in rows}

    def slots_and_running(self, study_names: list[str]) -> dict[str, tuple[int, int]]:
        """For each study: (trials holding a slot, RUNNING trials), in one query."""
        if not study_names:
            return {}
        with self.session() as s:
            rows = s.execute(text(
                "SELECT s.study_name AS name, "
                f"SUM(CASE WHEN CAST(t.state AS VARCHAR(16)) IN {SLOT_STATES_SQL} "
                "THEN 1 ELSE 0 END) AS slots, "
                "SUM(CASE WHEN CAST(t.state AS VARCHAR(16)) = 'RUNNING' THEN 1 ELSE 0 END) "
                "AS running FROM studies s LEFT JOIN trials t ON t.study_id = s.study_id "
                "WHERE s.study_name IN :names GROUP BY s.study_name"
            ).bindparams(bindparam("names", expanding=True)), {"names": study_names}).all()
        return {str(r.name): (int(r.slots or 0), int(r.running or 0)) for r in rows}

    def studies_with_unfinished_trials(self) -> list[str]:
        """Names of studies that hold RUNNING or WAITING trials."""
        with self.session() as s:
            return list(s.scalars(text(
                "SELECT DISTINCT s.study_name FROM trials t JOIN studies s "
                "ON s.study_id = t.study_id "
                "WHERE CAST(t.state AS VARCHAR(16)) IN ('RUNNING', 'WAITING')")))

    def running_trials_without_heartbeat(self, study_name: str) -> list[int]:
        """Ids of the study's RUNNING trials that never recorded a heartbeat.

        Optuna's stale-trial check skips these, so a worker that died between creating its
        trial and its first beat would leave it RUNNING forever; the reaper handles them.
        """
        with self.session() as s:
            return list(s.scalars(text(
                "SELECT t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE s.study_name = :name AND CAST(t.state AS VARCHAR(16)) = 'RUNNING' "
                "AND h.trial_id IS NULL"), {"name": study_name}))

    def retried_trial_numbers(self, study_name: str) -> set[int]:
        """Numbers of the study's trials that already have a retry (Optuna's retry_history)."""
        with self.session() as s:
            values = s.scalars(text(
                "SELECT a.value_json FROM trial_system_attributes a "
                "JOIN trials t ON t.trial_id = a.trial_id "
                "JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = :name AND a.key = 'retry_history'"), {"name": study_name})
            histories = [json.loads(v) for v in values]
        return {int(h[-1]) for h in histories if h}

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
