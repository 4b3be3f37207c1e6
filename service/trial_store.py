"""The trial store: the one module of service/ that touches Optuna's storage.

It owns the resilient storage (ResilientRDBStorage: Optuna's RDBStorage riding out outages
under retry.OutageBudget), every SQL statement over Optuna's tables (named, below), and every
use of Optuna's private names in service/: those shared with search/ live in
search/optuna_internals.py (search/ may not import service/) and are re-exported here. So
private Optuna names appear in one module per package, and tests/service/test_trial_store.py
pins all that this module relies on, so an Optuna upgrade that breaks it fails loudly.

The SQL reads Optuna's tables (studies, trials, trial_values, trial_heartbeats,
trial_system_attributes), whose shape has held since Optuna 2; it never writes them, except
ResilientRDBStorage's buffered user attributes through Optuna's own ORM models.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import optuna
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages._rdb import models
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial
from sqlalchemy import Float, Integer, String, bindparam, column, delete, select, text
from sqlalchemy.orm import selectinload

from search.optuna_internals import frozen_trial, stale_trial_ids, storage_of, study_id, trial_id
from search.pruners import RungValues
from search.sampler import Window, public_history, select_view
from service.models import Job
from service.retry import OutageBudget, is_transient

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from service.db import Database

__all__ = [
    "SLOT_STATES",
    "BoundedHistory",
    "FrozenStudy",
    "JobPage",
    "PageEntry",
    "PageIndex",
    "ResilientRDBStorage",
    "RungReader",
    "TrialPage",
    "event_anchor",
    "frozen_trial",
    "job_page_index",
    "job_summary",
    "owner_has_study",
    "owner_study_ids",
    "page_index",
    "page_trials",
    "read_page",
    "retried_trial_numbers",
    "running_and_failed",
    "running_trials_without_heartbeat",
    "slots_and_running",
    "slots_in_use",
    "stale_trial_ids",
    "storage_of",
    "studies_with_unfinished_trials",
    "study_id",
    "trial_changes",
    "trial_id",
    "trial_page",
    "trial_state_counts",
    "trial_study_id",
    "trial_summary_rows",
    "trial_totals",
    "trials_by_id",
]

T = TypeVar("T")

# Trial states that hold one of a job's n_trials slots: a job never has more of these than
# n_trials. WAITING (a queued retry) and FAIL do not; a claim pops a WAITING trial first.
SLOT_STATES = ("RUNNING", "COMPLETE", "PRUNED")
_SLOT_STATES_SQL = "(" + ", ".join(f"'{s}'" for s in SLOT_STATES) + ")"


class Lock(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...


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
                 state_lock: Lock | None = None, **kwargs: Any) -> None:
        self._budget = OutageBudget(retry_seconds, on_outage)
        self._retrying = self._budget.policy()
        self._state_lock = state_lock
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
        """`fn()` under the storage's retry policy (retry.OutageBudget): transient errors are
        retried until the outage has lasted `retry_seconds`. After an attempt whose outcome is
        unknown, a non-transient error goes to `after_unknown_outcome`, which may settle it."""
        attempts = itertools.count()

        def attempt() -> T:
            first = next(attempts) == 0
            try:
                self._flush()
                return fn()
            except Exception as exc:
                if not first and after_unknown_outcome is not None and not is_transient(exc):
                    settled = after_unknown_outcome(exc)
                    if settled is not None:
                        return settled
                raise

        result = self._retrying(attempt)
        self._budget.clear()
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



# --- named SQL over Optuna's tables (reads only; callers retry them through DB_RETRY) ------

_TRIAL_STATE_COUNTS = text(
    "SELECT CAST(t.state AS VARCHAR(16)) AS state, COUNT(*) AS n FROM trials t "
    "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :name "
    "GROUP BY t.state")
_RUNNING_AND_FAILED = text(
    "SELECT COUNT(CASE WHEN CAST(t.state AS VARCHAR(16)) = 'RUNNING' THEN 1 END) AS running, "
    "COUNT(CASE WHEN CAST(t.state AS VARCHAR(16)) = 'FAIL' THEN 1 END) AS failed "
    "FROM studies s LEFT JOIN trials t ON t.study_id = s.study_id AND "
    "CAST(t.state AS VARCHAR(16)) IN ('RUNNING', 'FAIL') "
    "WHERE s.study_name = :name GROUP BY s.study_id")
_SLOTS_IN_USE = text(
    "SELECT s.study_name AS name, COUNT(t.trial_id) AS n FROM studies s "
    "LEFT JOIN trials t ON t.study_id = s.study_id AND "
    f"CAST(t.state AS VARCHAR(16)) IN {_SLOT_STATES_SQL} "
    "WHERE s.study_name IN :names GROUP BY s.study_name"
).bindparams(bindparam("names", expanding=True))
_SLOTS_AND_RUNNING = text(
    "SELECT s.study_name AS name, "
    f"SUM(CASE WHEN CAST(t.state AS VARCHAR(16)) IN {_SLOT_STATES_SQL} "
    "THEN 1 ELSE 0 END) AS slots, "
    "SUM(CASE WHEN CAST(t.state AS VARCHAR(16)) = 'RUNNING' THEN 1 ELSE 0 END) "
    "AS running FROM studies s LEFT JOIN trials t ON t.study_id = s.study_id "
    "WHERE s.study_name IN :names GROUP BY s.study_name"
).bindparams(bindparam("names", expanding=True))
_STUDIES_WITH_UNFINISHED_TRIALS = text(
    "SELECT DISTINCT s.study_name FROM trials t JOIN studies s "
    "ON s.study_id = t.study_id "
    "WHERE CAST(t.state AS VARCHAR(16)) IN ('RUNNING', 'WAITING')")
_RUNNING_WITHOUT_HEARTBEAT = text(
    "SELECT t.trial_id FROM trials t JOIN studies s ON s.study_id = t.study_id "
    "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
    "WHERE s.study_name = :name AND CAST(t.state AS VARCHAR(16)) = 'RUNNING' "
    "AND h.trial_id IS NULL")
_RETRY_HISTORIES = text(
    "SELECT a.value_json FROM trial_system_attributes a "
    "JOIN trials t ON t.trial_id = a.trial_id "
    "JOIN studies s ON s.study_id = t.study_id "
    "WHERE s.study_name = :name AND a.key = 'retry_history'")
# Counts and best values of many studies in one aggregate query: loading every trial of every
# listed job would cost a query per trial attribute.
_TRIAL_SUMMARY = text("""
    SELECT s.study_name AS study, t.state AS state, count(*) AS n,
           max(v.value) AS best_max, min(v.value) AS best_min
    FROM studies s
    JOIN trials t ON t.study_id = s.study_id
    LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0
    WHERE s.study_name IN :names
    GROUP BY s.study_name, t.state
""").bindparams(bindparam("names", expanding=True))
# A job's row with its study's trials counted by state and the best first-objective values
# of its COMPLETE ones, in one statement: what GET /jobs/{id} shows. Rows: the job's (absent
# if there is no such job), one per trial state (`trial_state`, `n`), one with `best_max`
# and `best_min`; the others' columns NULL. Counting apart from the values (rather than
# joining values to every trial) halves the statement's time.
_JOB_COLUMNS = [c.name for c in Job.__table__.c]
_NO_JOB = ", ".join("NULL" for _ in _JOB_COLUMNS)
_JOB_SUMMARY = text(
    "SELECT " + ", ".join(f"j.{c}" for c in _JOB_COLUMNS) + """,
           CAST(NULL AS VARCHAR(16)) AS trial_state, CAST(NULL AS INTEGER) AS n,
           CAST(NULL AS FLOAT) AS best_max, CAST(NULL AS FLOAT) AS best_min
    FROM hptune_jobs j WHERE j.id = :job_id
    UNION ALL SELECT """ + _NO_JOB + """, CAST(t.state AS VARCHAR(16)), COUNT(*), NULL, NULL
    FROM hptune_jobs j JOIN studies s ON s.study_name = j.study_name
    JOIN trials t ON t.study_id = s.study_id WHERE j.id = :job_id GROUP BY t.state
    UNION ALL SELECT """ + _NO_JOB + """, NULL, NULL, MAX(v.value), MIN(v.value)
    FROM hptune_jobs j JOIN studies s ON s.study_name = j.study_name
    JOIN trials t ON t.study_id = s.study_id
    JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0
    WHERE j.id = :job_id AND CAST(t.state AS VARCHAR(16)) = 'COMPLETE'
""").columns(*Job.__table__.c, column("trial_state", String), column("n", Integer),
             column("best_max", Float), column("best_min", Float))
# Who owns a study is the service's word, not the study's: hptune_jobs.owner of the job whose
# study it is (the study's "owner" user attribute says the same, but lives in Optuna's tables).
# Studies that belong to no job are an admin's alone.
_OWNER_STUDY_IDS = text("""
    SELECT s.study_id FROM studies s
    JOIN hptune_jobs j ON j.study_name = s.study_name
    WHERE j.owner = :owner
""")
_OWNER_HAS_STUDY = text("""
    SELECT 1 FROM studies s
    JOIN hptune_jobs j ON j.study_name = s.study_name
    WHERE s.study_id = :study_id AND j.owner = :owner
""")
# One page of a study's trials, by number (at most :limit above :after), and the study's
# trial count, in one statement: the study's row (kind 0: `n` counts its trials; absent when
# the study is gone), then the page's trials (kind 1: id, number, state, times). A page costs
# what it shows however many trials the study has. The first branch types every column
# (PostgreSQL resolves a UNION's NULLs pair by pair).
_PAGE_INDEX = text("""
    SELECT 0 AS kind, s.study_id AS trial_id, COUNT(t.trial_id) AS number,
           CAST(NULL AS VARCHAR(16)) AS state, CAST(NULL AS TIMESTAMP) AS t0,
           CAST(NULL AS TIMESTAMP) AS t1
    FROM studies s LEFT JOIN trials t ON t.study_id = s.study_id
    WHERE s.study_name = :name GROUP BY s.study_id
    UNION ALL SELECT * FROM (
        SELECT 1, t.trial_id, t.number, CAST(t.state AS VARCHAR(16)), t.datetime_start,
               t.datetime_complete
        FROM trials t JOIN studies s ON s.study_id = t.study_id
        WHERE s.study_name = :name AND t.number > :after ORDER BY t.number LIMIT :limit) page
""")
# The same for GET /jobs/{id}/trials, by job id, in one statement: kind 0 is the job's row
# (its owner and study name; the study's id, NULL while the job has no study or once the
# study is gone; the trial count; absent if there is no such job). The caller checks owners.
_JOB_PAGE_INDEX = text("""
    SELECT 0 AS kind, s.study_id AS trial_id, COUNT(t.trial_id) AS number,
           CAST(NULL AS VARCHAR(16)) AS state, CAST(NULL AS TIMESTAMP) AS t0,
           CAST(NULL AS TIMESTAMP) AS t1, j.owner AS owner, j.study_name AS study_name
    FROM hptune_jobs j LEFT JOIN studies s ON s.study_name = j.study_name
    LEFT JOIN trials t ON t.study_id = s.study_id
    WHERE j.id = :job_id GROUP BY j.id, s.study_id
    UNION ALL SELECT * FROM (
        SELECT 1, t.trial_id, t.number, CAST(t.state AS VARCHAR(16)), t.datetime_start,
               t.datetime_complete, NULL, NULL
        FROM hptune_jobs j JOIN studies s ON s.study_name = j.study_name
        JOIN trials t ON t.study_id = s.study_id
        WHERE j.id = :job_id AND t.number > :after ORDER BY t.number LIMIT :limit) page
""")
# All that Optuna stores of some trials besides their row, in one statement and without ORM
# objects (building those cost ~2 ms a trial): a row's `kind` is 2 for a parameter (`label`
# its name, `x` its stored value, `body` its distribution, `ord` its id), 3 a value (`ord`
# the objective, `label` its type), 4 an intermediate value (`ord` the step), 5 and 6 a user
# and a system attribute (`label` the key, `body` the JSON).
_TRIAL_ROWS = text("""
    SELECT 2 AS kind, p.trial_id, p.param_id AS ord, p.param_name AS label,
           p.param_value AS x, p.distribution_json AS body
    FROM trial_params p WHERE p.trial_id IN :ids
    UNION ALL SELECT 3, v.trial_id, v.objective, CAST(v.value_type AS VARCHAR(16)), v.value,
        NULL FROM trial_values v WHERE v.trial_id IN :ids
    UNION ALL SELECT 4, i.trial_id, i.step, CAST(i.intermediate_value_type AS VARCHAR(16)),
        i.intermediate_value, NULL FROM trial_intermediate_values i WHERE i.trial_id IN :ids
    UNION ALL SELECT 5, a.trial_id, 0, a.key, NULL, a.value_json
        FROM trial_user_attributes a WHERE a.trial_id IN :ids
    UNION ALL SELECT 6, a.trial_id, 0, a.key, NULL, a.value_json
        FROM trial_system_attributes a WHERE a.trial_id IN :ids
""").bindparams(bindparam("ids", expanding=True))
# (number of the retry, its retry_history) for each retry in the study: links a failed trial
# on a page to the later trial that re-ran it. One short row per retry, not per trial.
_RETRY_LINKS = text(
    "SELECT t.number AS number, a.value_json AS history FROM trial_system_attributes a "
    "JOIN trials t ON t.trial_id = a.trial_id "
    "JOIN studies s ON s.study_id = t.study_id "
    "WHERE s.study_name = :name AND a.key = 'retry_history'")
# An event stream's poll (service.events): where its cursor points, once per connection, then
# the trials created since the last one it sent (a page of them), and those it is watching.
_EVENT_ANCHOR_ID = text(
    "SELECT MAX(trial_id) FROM trials WHERE study_id = :study_id AND number <= :last")
_EVENT_OPEN_IDS = text(
    "SELECT trial_id, number FROM trials WHERE study_id = :study_id AND number IN :numbers"
).bindparams(bindparam("numbers", expanding=True))
_EVENT_NEW = text(
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE study_id = :study_id AND trial_id > :after AND number > :last "
    "ORDER BY trial_id LIMIT :limit")
_EVENT_WATCHED = text(
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE trial_id IN :ids").bindparams(bindparam("ids", expanding=True))
_TRIAL_STUDY_ID = text("SELECT study_id FROM trials WHERE trial_id = :trial_id")
# State and first objective value of some of a study's trials (those with stored artifacts).
_STATES_AND_VALUES = text(
    "SELECT t.number AS number, CAST(t.state AS VARCHAR(16)) AS state, v.value AS value "
    "FROM trials t JOIN studies s ON s.study_id = t.study_id "
    "LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 "
    "WHERE s.study_name = :name AND t.number IN :numbers"
).bindparams(bindparam("numbers", expanding=True))
# Optuna's trial state names, as trial_totals sums them.
_TRIAL_STATE_NAMES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
# A finished trial's wall time in seconds, in each dialect's date arithmetic (NULL while the
# trial has no start or end).
_DURATION_S = {
    "sqlite": "(julianday(t.datetime_complete) - julianday(t.datetime_start)) * 86400.0",
    "postgresql": "EXTRACT(EPOCH FROM (t.datetime_complete - t.datetime_start))",
}


def trial_state_counts(db: Database, study_name: str) -> dict[str, int]:
    """The study's trials by state name (RUNNING, COMPLETE, PRUNED, FAIL, WAITING)."""
    with db.session() as s:
        rows = s.execute(_TRIAL_STATE_COUNTS, {"name": study_name}).all()
    return {str(r.state): int(r.n) for r in rows}


def running_and_failed(db: Database, study_name: str) -> tuple[int, int] | None:
    """How many of the study's trials are RUNNING and FAIL; None if there is no such study."""
    with db.session() as s:
        row = s.execute(_RUNNING_AND_FAILED, {"name": study_name}).first()
    return None if row is None else (int(row.running), int(row.failed))


def slots_in_use(db: Database, study_names: list[str]) -> dict[str, int]:
    """For each study, its trials that hold one of the job's slots: RUNNING or finished."""
    if not study_names:
        return {}
    with db.session() as s:
        rows = s.execute(_SLOTS_IN_USE, {"names": study_names}).all()
    return {str(r.name): int(r.n) for r in rows}


def slots_and_running(db: Database, study_names: list[str]) -> dict[str, tuple[int, int]]:
    """For each study: (trials holding a slot, RUNNING trials), in one query."""
    if not study_names:
        return {}
    with db.session() as s:
        rows = s.execute(_SLOTS_AND_RUNNING, {"names": study_names}).all()
    return {str(r.name): (int(r.slots or 0), int(r.running or 0)) for r in rows}


def studies_with_unfinished_trials(db: Database) -> list[str]:
    """Names of studies that hold RUNNING or WAITING trials."""
    with db.session() as s:
        return list(s.scalars(_STUDIES_WITH_UNFINISHED_TRIALS))


def running_trials_without_heartbeat(db: Database, study_name: str) -> list[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat.

    Optuna's stale-trial check skips these, so a worker that died between creating its
    trial and its first beat would leave it RUNNING forever; the reaper handles them.
    """
    with db.session() as s:
        return list(s.scalars(_RUNNING_WITHOUT_HEARTBEAT, {"name": study_name}))


def retried_trial_numbers(db: Database, study_name: str) -> set[int]:
    """Numbers of the study's trials that already have a retry (Optuna's retry_history)."""
    with db.session() as s:
        histories = [json.loads(v) for v in s.scalars(_RETRY_HISTORIES, {"name": study_name})]
    return {int(h[-1]) for h in histories if h}


def states_and_values(db: Database, study_name: str, numbers: Iterable[int]
                      ) -> dict[int, tuple[str, float | None]]:
    """{number: (state name, first objective value or None)} of the given trials."""
    numbers = sorted(set(numbers))
    if not numbers:
        return {}
    with db.session() as s:
        rows = s.execute(_STATES_AND_VALUES, {"name": study_name, "numbers": numbers}).all()
    return {int(r.number): (str(r.state), None if r.value is None else float(r.value))
            for r in rows}


def trial_summary_rows(db: Database, study_names: Iterable[str],
                       session: Session | None = None) -> list[Any]:
    """Rows (study, state, n, best_max, best_min) per study and trial state; best_* are the
    first objective's extremes. Reads through `session` when given (one that holds a lock
    must not wait for a second pooled connection)."""
    names = list(study_names)
    if not names:
        return []
    if session is not None:
        return list(session.execute(_TRIAL_SUMMARY, {"names": names}))
    with db.session() as s:
        return list(s.execute(_TRIAL_SUMMARY, {"names": names}))


def job_summary(db: Database, job_id: int) -> tuple[Any, list[Any], Any] | None:
    """Job `job_id`'s row (its columns typed as the ORM's), rows (trial_state, n) of its
    study's trials by state, and a row (best_max, best_min) of its COMPLETE trials' first
    objective; None if there is no such job. One query (_JOB_SUMMARY)."""
    with db.reading() as conn:
        rows = conn.execute(_JOB_SUMMARY, {"job_id": job_id}).all()
    job = next((r for r in rows if r.id is not None), None)
    if job is None:
        return None
    best = next((r for r in rows if r.id is None and r.trial_state is None), None)
    return job, [r for r in rows if r.trial_state is not None], best


def owner_study_ids(db: Database, owner: str) -> set[int]:
    """Ids of the Optuna studies of `owner`'s jobs."""
    with db.session() as s:
        return {int(r[0]) for r in s.execute(_OWNER_STUDY_IDS, {"owner": owner})}


def owner_has_study(db: Database, owner: str, study_id: int) -> bool:
    with db.session() as s:
        return s.execute(_OWNER_HAS_STUDY, {"owner": owner, "study_id": study_id}
                         ).first() is not None


def trial_study_id(db: Database, trial_id: int) -> int | None:
    with db.session() as s:
        value = s.execute(_TRIAL_STUDY_ID, {"trial_id": trial_id}).scalar()
    return None if value is None else int(value)


class TrialTotals(NamedTuple):
    """Some studies' trials summed: by state name, and finished trials' wall times as the
    count, the sum and cumulative counts at each bucket bound (seconds)."""

    states: dict[str, int]
    durations: int
    duration_sum: float
    buckets: tuple[int, ...]


def trial_totals(db: Database, study_names: Sequence[str], buckets_s: Sequence[float]
                 ) -> dict[str, TrialTotals]:
    """For each of the studies, its trials summed in the database (never loaded)."""
    if not study_names:
        return {}
    seconds = _DURATION_S["sqlite" if db.settings.is_sqlite else "postgresql"]
    # The bounds are the caller's numbers (float() makes them plain literals), never input.
    cases = "".join(f", SUM(CASE WHEN d <= {float(b)!r} THEN 1 ELSE 0 END) AS b{i}"
                    for i, b in enumerate(buckets_s))
    states = "".join(f", SUM(CASE WHEN state = '{name}' THEN 1 ELSE 0 END) AS {name.lower()}"
                     for name in _TRIAL_STATE_NAMES)
    query = text(
        f"SELECT name, COUNT(d) AS n, COALESCE(SUM(d), 0) AS total{cases}{states} FROM "
        f"(SELECT s.study_name AS name, CAST(t.state AS VARCHAR(16)) AS state, {seconds} AS d "
        "FROM studies s JOIN trials t ON t.study_id = s.study_id "
        "WHERE s.study_name IN :names) x GROUP BY name"
    ).bindparams(bindparam("names", expanding=True))
    with db.session() as s:
        rows = s.execute(query, {"names": list(study_names)}).all()
    return {str(r.name): TrialTotals(
        {name: int(getattr(r, name.lower()) or 0) for name in _TRIAL_STATE_NAMES},
        int(r.n), float(r.total),
        tuple(int(getattr(r, f"b{i}") or 0) for i in range(len(buckets_s))))
        for r in rows}


def trial_page(db: Database, study_name: str, after: int, limit: int
               ) -> tuple[list[FrozenTrial], dict[int, int]]:
    """At most `limit` of the study's trials numbered above `after`, in number order, and
    {failed trial number: number of its retry} for the failed ones among them (read_page;
    a missing study has no trials)."""
    page = read_page(db, study_name, after, limit)
    return ([], {}) if page is None else (page.trials, page.retried_as)


class PageEntry(NamedTuple):
    """A trial of a page as its row says. Its times are naive UTC as the driver gives them
    (SQLite: text), parsed only when the trial is built (a page of cached trials needs
    none: parsing them was a tenth of such a page's cost)."""

    trial_id: int
    number: int
    state: str
    datetime_start: datetime.datetime | str | None
    datetime_complete: datetime.datetime | str | None


class PageIndex(NamedTuple):
    study_id: int
    total: int  # the study's trials, all pages
    entries: list[PageEntry]  # the page's trials, in number order


class JobPage(NamedTuple):
    owner: str
    study_name: str | None  # None: the job has no study yet
    index: PageIndex | None  # None: no study yet, or the study is gone


class TrialPage(NamedTuple):
    trials: list[FrozenTrial]
    retried_as: dict[int, int]  # failed trial number -> number of its retry
    total: int  # the study's trials, all pages


def read_page(db: Database, study_name: str, after: int, limit: int) -> TrialPage | None:
    """At most `limit` of the study's trials numbered above `after`, in number order, the
    retries of the failed ones among them and the study's trial count; None if the study is
    gone. Two queries (_PAGE_INDEX, then _TRIAL_ROWS for every relation of the page's trials)
    and one for the retry links when the page holds a failed trial: never a load of the
    study, never ORM objects."""
    with db.reading() as conn:
        index = _page_index(conn, study_name, after, limit)
        if index is None:
            return None
        trials, retried_as = _page_trials(conn, study_name, index.entries)
    return TrialPage(trials, retried_as, index.total)


def page_index(db: Database, study_name: str, after: int, limit: int) -> PageIndex | None:
    """The study's id and trial count and the rows of at most `limit` of its trials numbered
    above `after`, in one query; None if the study is gone."""
    with db.reading() as conn:
        return _page_index(conn, study_name, after, limit)


def job_page_index(db: Database, job_id: int, after: int, limit: int) -> JobPage | None:
    """page_index for job `job_id`'s study, with the job's owner and study name, in one
    query (_JOB_PAGE_INDEX); None if there is no such job."""
    with db.reading() as conn:
        rows = conn.execute(_JOB_PAGE_INDEX, {"job_id": job_id, "after": after,
                                              "limit": limit}).all()
    head = next((r for r in rows if r.kind == 0), None)
    if head is None:
        return None
    index = _index_from_rows([r[:6] for r in rows]) if head.trial_id is not None else None
    return JobPage(head.owner, head.study_name, index)


def page_trials(db: Database, study_name: str, entries: Sequence[PageEntry]
                ) -> tuple[list[FrozenTrial], dict[int, int]]:
    """The trials of `entries` (page_index's) as FrozenTrials equal to Optuna's own, and
    {failed trial number: number of its retry} for the failed ones among them."""
    with db.reading() as conn:
        return _page_trials(conn, study_name, entries)


def _page_index(s: Connection, study_name: str, after: int, limit: int) -> PageIndex | None:
    return _index_from_rows(
        s.execute(_PAGE_INDEX, {"name": study_name, "after": after, "limit": limit}).all())


def _index_from_rows(rows: Iterable[Sequence[Any]]) -> PageIndex | None:
    """A PageIndex from rows (kind, id, number, state, start, end); None without kind 0's."""
    study: tuple[int, int] | None = None
    entries = []
    for kind, trial_id_, number, state, t0, t1 in rows:
        if kind == 0:
            study = (int(trial_id_), int(number))
        else:
            entries.append(PageEntry(int(trial_id_), int(number), state, t0, t1))
    if study is None:
        return None
    entries.sort(key=lambda e: e.number)
    return PageIndex(study[0], study[1], entries)


def _page_trials(s: Connection, study_name: str, entries: Sequence[PageEntry]
                 ) -> tuple[list[FrozenTrial], dict[int, int]]:
    if not entries:
        return [], {}
    parts: dict[int, tuple[list, list, dict, dict, list]] = {
        e.trial_id: ([], [], {}, {}, []) for e in entries}
    # .all(): one fetchall; iterating the result would fetch row by row.
    for kind, tid, ord_, label, x, body in s.execute(
            _TRIAL_ROWS, {"ids": [e.trial_id for e in entries]}).all():
        params, values, user, system, steps = parts[tid]
        if kind == 2:
            params.append((ord_, label, x, body))
        elif kind == 3:
            values.append((ord_, label, x))
        elif kind == 4:
            steps.append((ord_, label, x))
        else:
            (user if kind == 5 else system)[label] = body
    trials = [_frozen(e, *parts[e.trial_id]) for e in entries]
    failed = {t.number for t in trials if t.state == optuna.trial.TrialState.FAIL}
    retried_as: dict[int, int] = {}
    if failed:
        for row in s.execute(_RETRY_LINKS, {"name": study_name}):
            history = json.loads(row.history)
            if history and int(history[-1]) in failed:
                retried_as[int(history[-1])] = int(row.number)
    return trials, retried_as


@functools.lru_cache(maxsize=1024)
def _distribution(distribution_json: str) -> BaseDistribution:
    # A job's trials share a handful of distributions; parsing one costs ~30 µs.
    return json_to_distribution(distribution_json)


def _local_time(utc: datetime.datetime | str | None) -> datetime.datetime | None:
    """Optuna stores naive UTC and gives naive local time (TrialModel.datetime_start); SQLite
    hands it back as SQLAlchemy wrote it, ISO 8601 text."""
    if utc is None:
        return None
    if isinstance(utc, str):
        utc = datetime.datetime.fromisoformat(utc)
    return utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


_VALUE_TYPE = models.TrialValueModel.TrialValueType
_STEP_TYPE = models.TrialIntermediateValueModel.TrialIntermediateValueType


def _frozen(entry: PageEntry, params: list, values: list, user: dict, system: dict,
            steps: list) -> FrozenTrial:
    """The trial as Optuna's _build_frozen_trial_from_trial_model builds it: parameters in id
    order, values by objective; stored infinities and NaN decoded by Optuna's models. Keys of
    attributes and steps ascending (Optuna's own reads leave their order to the database)."""
    params.sort()
    dists = {name: _distribution(body) for _, name, _, body in params}
    return FrozenTrial(
        number=entry.number, state=optuna.trial.TrialState[entry.state], value=None,
        values=[x if t == "FINITE" else models.TrialValueModel.stored_repr_to_value(
            x, _VALUE_TYPE[t]) for _, t, x in sorted(values)] or None,
        datetime_start=_local_time(entry.datetime_start),
        datetime_complete=_local_time(entry.datetime_complete),
        params={name: dists[name].to_external_repr(x) for _, name, x, _ in params},
        distributions=dists,
        user_attrs={k: json.loads(user[k]) for k in sorted(user)},
        system_attrs={k: json.loads(system[k]) for k in sorted(system)},
        intermediate_values={
            step: x if t == "FINITE" else
            models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                x, _STEP_TYPE[t]) for step, t, x in sorted(steps)},
        trial_id=entry.trial_id)


def trials_by_id(db: Database, ids: Iterable[int]) -> list[FrozenTrial]:
    """The trials `ids` in number order, each relation (params, values, attributes,
    intermediate values) read in one query for all of them: six queries however many."""
    ids = sorted(set(ids))
    if not ids:
        return []
    storage = db.storage
    with _storage_session(storage) as session:
        trials = _load_for_sampler(storage, session, set(ids))
    return sorted(trials, key=lambda t: t.number)


@contextlib.contextmanager
def _storage_session(storage: optuna.storages.RDBStorage) -> Iterator[Any]:
    """A session of Optuna's storage: committed on success, rolled back on error, closed."""
    session = storage.scoped_session()
    try:
        yield session
        session.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            session.rollback()
        raise
    finally:
        session.close()


def event_anchor(db: Database, study_name: str, last: int, numbers: Iterable[int]
                 ) -> tuple[int, int, dict[int, int]] | None:
    """Where an event stream's cursor points in the study: (the study's id, the id of its
    last trial numbered up to `last`, 0 if none, {number: trial id} of the trials `numbers`
    that exist), or None if the study is gone. Read once per connection."""
    numbers = sorted(set(numbers))
    with db.session() as s:
        sid = s.execute(_STUDY_ID_OF, {"name": study_name}).scalar()
        if sid is None:
            return None
        after = s.execute(_EVENT_ANCHOR_ID, {"study_id": sid, "last": last}).scalar()
        ids = ({int(r.number): int(r.trial_id) for r in s.execute(
            _EVENT_OPEN_IDS, {"study_id": sid, "numbers": numbers})} if numbers else {})
    return int(sid), int(after or 0), ids


def trial_changes(db: Database, study_id: int, after_id: int, last: int,
                  watch_ids: Iterable[int], limit: int) -> tuple[list[Any], list[Any]]:
    """Rows (trial_id, number, state) of an event stream's poll: at most `limit` trials
    created after trial id `after_id` and numbered above `last`, in order; and the trials
    `watch_ids` (those it sent while unfinished). Two index ranges, bounded by the page and
    the watched trials, never a scan of the study's rows into the process."""
    watch = sorted(set(watch_ids))
    with db.session() as s:
        new = s.execute(_EVENT_NEW, {"study_id": study_id, "after": after_id, "last": last,
                                     "limit": limit}).all()
        watched = s.execute(_EVENT_WATCHED, {"ids": watch}).all() if watch else []
    return list(new), list(watched)


def _frozen_from_model(storage: optuna.storages.RDBStorage, row: Any) -> FrozenTrial:
    """A FrozenTrial from Optuna's ORM row, built by Optuna's own (private) builder."""
    return storage._build_frozen_trial_from_trial_model(row)


# --- a sampler's bounded view of a study (search.sampler), read a bounded amount at a time --

def _rank_sql(type_column: str, maximize: bool) -> str:
    """A stored value's type ranked as TPE ranks values (0 best): the good infinity, finite
    values, then the bad infinity and NaN (which TPE ranks alike). Infinities are NULL values."""
    best = "INF_POS" if maximize else "INF_NEG"
    return (f"CASE CAST({type_column} AS VARCHAR(16)) WHEN '{best}' THEN 0 "
            "WHEN 'FINITE' THEN 1 ELSE 2 END")


def _view_queries(maximize: bool) -> dict[str, Any]:
    order = "DESC" if maximize else "ASC"
    return {
        # The best COMPLETE trials by their value, ties to the lower number (TPE's order).
        "best_complete": text(
            "SELECT t.trial_id, t.number, CAST(t.state AS VARCHAR(16)) AS state FROM trials t "
            "JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 "
            "WHERE t.study_id = :study_id AND CAST(t.state AS VARCHAR(16)) = 'COMPLETE' "
            f"ORDER BY {_rank_sql('v.value_type', maximize)}, v.value {order}, t.number "
            "LIMIT :k"),
        # The best PRUNED trials as TPE ranks them: latest last step first, then the value
        # there; trials that reported nothing last.
        "best_pruned": text(
            "SELECT t.trial_id, t.number, CAST(t.state AS VARCHAR(16)) AS state FROM trials t "
            "LEFT JOIN (SELECT iv.trial_id AS trial_id, MAX(iv.step) AS step "
            "  FROM trial_intermediate_values iv JOIN trials p ON p.trial_id = iv.trial_id "
            "  WHERE p.study_id = :study_id AND CAST(p.state AS VARCHAR(16)) = 'PRUNED' "
            "  GROUP BY iv.trial_id) ls ON ls.trial_id = t.trial_id "
            "LEFT JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
            "AND v.step = ls.step "
            "WHERE t.study_id = :study_id AND CAST(t.state AS VARCHAR(16)) = 'PRUNED' "
            "ORDER BY CASE WHEN ls.step IS NULL THEN 1 ELSE 0 END, ls.step DESC, "
            f"{_rank_sql('v.intermediate_value_type', maximize)}, "
            f"v.intermediate_value {order}, t.number LIMIT :k"),
    }


_VIEW_QUERIES = {maximize: _view_queries(maximize) for maximize in (False, True)}
_STUDY_ID_OF = text("SELECT study_id FROM studies WHERE study_name = :name")
_MAX_TRIAL_ID = text("SELECT MAX(trial_id) FROM trials WHERE study_id = :study_id")
_RECENT_FINISHED = text(
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE study_id = :study_id AND CAST(state AS VARCHAR(16)) IN ('COMPLETE', 'PRUNED') "
    "ORDER BY number DESC LIMIT :k")
# RUNNING and WAITING trials: as many as the job's workers and queued retries.
_UNFINISHED = text(
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE study_id = :study_id AND CAST(state AS VARCHAR(16)) IN ('RUNNING', 'WAITING')")
# What changed since the last read: trials created since, and those unfinished then. Two
# index ranges (the study's index holds the trial id), where an OR would scan the study.
_CHANGED_SINCE = text(
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE study_id = :study_id AND trial_id > :after UNION ALL "
    "SELECT trial_id, number, CAST(state AS VARCHAR(16)) AS state FROM trials "
    "WHERE study_id = :study_id AND trial_id IN :watch AND trial_id <= :after"
).bindparams(bindparam("watch", expanding=True))


class BoundedHistory:
    """The sampler's view of one study (search.sampler: best, recent and running trials),
    read from the database a bounded amount per ask: a history source for build_sampler.

    The first read loads only the view's trials, picked by SQL; later reads load only what
    changed since (trials created since, and those unfinished then) and keep the view in
    memory, which works because a view of old and new trials is the view of all (see
    search.sampler.select_view). If more changed than a view holds (the worker was away),
    the view is read afresh. A worker keeps one per open study (service/worker.py), across the
    re-seeded samplers of its trials.
    """

    def __init__(self, db: Database, study_name: str) -> None:
        self.db = db
        self.study_name = study_name
        self._study_id: int | None = None
        self._after = 0  # the highest trial id read
        self._watch: set[int] = set()  # ids of the trials unfinished at the last read
        self._kept: dict[int, FrozenTrial] = {}  # the view's finished trials, by number
        # Trials built from rows: at the last read, and in all (tests and benchmarks read them).
        self.last_loaded = 0
        self.loaded = 0

    def __call__(self, study: optuna.Study, window: Window) -> list[FrozenTrial]:
        if study.study_name != self.study_name:
            raise ValueError(f"history of {self.study_name!r} asked for {study.study_name!r}")
        if len(study.directions) > 1:
            return public_history(study, window)
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        storage = self.db.storage
        return storage._call(lambda: self._read(storage, maximize, window))

    def _read(self, storage: optuna.storages.RDBStorage, maximize: bool, window: Window
              ) -> list[FrozenTrial]:
        with _storage_session(storage) as session:
            rows = self._changes(session, window) if self._study_id is not None else None
            if rows is None:
                rows = self._view_rows(session, maximize, window)
            running = sorted((r for r in rows if r.state == "RUNNING"),
                             key=lambda r: -r.number)[:window.running]
            wanted = {r.trial_id for r in rows if r.state in ("COMPLETE", "PRUNED")}
            trials = _load_for_sampler(storage, session, wanted | {r.trial_id for r in running})
        self._after = max([self._after, *(r.trial_id for r in rows)])
        self._watch = {r.trial_id for r in rows if r.state in ("RUNNING", "WAITING")}
        self.last_loaded = len(trials)
        self.loaded += len(trials)
        self._kept.update((t.number, t) for t in trials if t.state.is_finished())
        running_now = [t for t in trials if not t.state.is_finished()]
        view = select_view([*self._kept.values(), *running_now], maximize, window)
        self._kept = {t.number: t for t in view if t.state.is_finished()}
        return view

    def _changes(self, session: Any, window: Window) -> list[Any] | None:
        """Rows of the trials created or unfinished since the last read; None if more than
        a view holds changed (then the view is read afresh)."""
        rows = session.execute(_CHANGED_SINCE, {"study_id": self._study_id, "after": self._after,
                                                "watch": sorted(self._watch)}).all()
        return rows if len(rows) <= window.recent + window.running else None

    def _view_rows(self, session: Any, maximize: bool, window: Window) -> list[Any]:
        """Rows of the view's trials, picked by SQL, and of every unfinished trial."""
        study_id = self._study_id
        if study_id is None:
            study_id = self._study_id = int(session.execute(
                _STUDY_ID_OF, {"name": self.study_name}).scalar_one())
        self._kept = {}
        self._after = int(session.execute(_MAX_TRIAL_ID, {"study_id": study_id}).scalar() or 0)
        rows: list[Any] = []
        for query, k in ((_VIEW_QUERIES[maximize]["best_complete"], window.best),
                         (_VIEW_QUERIES[maximize]["best_pruned"], window.best),
                         (_RECENT_FINISHED, window.recent)):
            rows += session.execute(query, {"study_id": study_id, "k": k}).all()
        return rows + session.execute(_UNFINISHED, {"study_id": study_id}).all()


# Values recorded at a successive-halving rung (search.pruners) since a system attribute id:
# the primary key's range, so a read costs what was recorded since, not the study's size.
_RUNG_VALUES_SINCE = text(
    "SELECT a.trial_system_attribute_id AS id, a.trial_id AS trial_id, a.value_json AS value "
    "FROM trial_system_attributes a JOIN trials t ON t.trial_id = a.trial_id "
    "WHERE a.trial_system_attribute_id > :after AND t.study_id = :study_id AND a.key = :key "
    "ORDER BY a.trial_system_attribute_id")


class RungReader:
    """The values recorded at each successive-halving rung of one study, read incrementally:
    a rung source for search.pruners.BoundedSuccessiveHalvingPruner.

    Each call reads only the rung's values recorded since the last read (attribute ids above
    the highest seen), so a pruning decision costs the same at trial 300 and trial 10,000.
    Ids are handed out in commit order on SQLite; on PostgreSQL a value whose transaction
    commits after a later id's is missed by the incremental read, so every `full_every`-th
    read of a rung reads it whole. A worker keeps one per open study (service/worker.py).
    """

    def __init__(self, db: Database, study_name: str, full_every: int = 200) -> None:
        self.db = db
        self.study_name = study_name
        self.full_every = full_every
        self._study_id: int | None = None
        self._rungs: dict[str, tuple[int, int, RungValues]] = {}  # key: (after, reads, values)
        self.last_read = 0  # rows read: by the last call, and in all (tests and benchmarks)
        self.rows_read = 0

    def __call__(self, study: optuna.Study, key: str) -> RungValues:
        if study.study_name != self.study_name:
            raise ValueError(f"rungs of {self.study_name!r} asked for {study.study_name!r}")
        storage = self.db.storage
        return storage._call(lambda: self._read(storage, key))

    def _read(self, storage: optuna.storages.RDBStorage, key: str) -> RungValues:
        after, reads, values = self._rungs.get(key, (0, 0, RungValues()))
        if reads % self.full_every == 0:
            after, values = 0, RungValues()
        with _storage_session(storage) as session:
            if self._study_id is None:
                self._study_id = int(session.execute(
                    _STUDY_ID_OF, {"name": self.study_name}).scalar_one())
            rows = session.execute(_RUNG_VALUES_SINCE, {
                "after": after, "study_id": self._study_id, "key": key}).all()
        for row in rows:
            values.add(int(row.trial_id), float(json.loads(row.value)))
        self.last_read = len(rows)
        self.rows_read += len(rows)
        self._rungs[key] = (max([after, *(int(r.id) for r in rows)]), reads + 1, values)
        return values


def _load_for_sampler(storage: optuna.storages.RDBStorage, session: Any, ids: set[int]
                      ) -> list[FrozenTrial]:
    """The trials `ids` as FrozenTrials, in one query per relation (as trial_page loads)."""
    if not ids:
        return []
    rows = (session.query(models.TrialModel)
            .options(selectinload(models.TrialModel.params),
                     selectinload(models.TrialModel.values),
                     selectinload(models.TrialModel.system_attributes),
                     selectinload(models.TrialModel.intermediate_values),
                     selectinload(models.TrialModel.user_attributes))
            .filter(models.TrialModel.trial_id.in_(sorted(ids))).all())
    return [_frozen_from_model(storage, r) for r in rows]
