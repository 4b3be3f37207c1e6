"""The one retry policy for database calls: which errors are transient, how long to wait
between attempts, when to give up (DatabaseUnavailable, which the API answers with 503).

`DB_RETRY` is a tenacity policy object: `DB_RETRY(fn, *args)` calls `fn`, retrying transient
errors (locks, deadlocks, lost connections) with capped exponential backoff and jitter, at
most RETRY_ATTEMPTS times. Optuna storage calls are not wrapped in it: the storage
(service/trial_store.ResilientRDBStorage) retries them itself with `OutageBudget.policy()`,
the same policy stopped by a time budget shared by all its calls instead of an attempt count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import optuna
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from service.errors import DatabaseUnavailable

# Bounded retries for transient database errors (locks, deadlocks, dropped connections).
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY_S = 0.05
# Longest pause between two retries of one call during an outage (before its jitter).
RETRY_MAX_DELAY_S = 2.0

_TRANSIENT_TEXT = (
    "database is locked", "deadlock", "could not serialize", "connection", "server closed",
    "terminating", "refused", "ssl syscall", "the database system is", "could not connect",
    "timeout expired", "consuming input failed", "no connection", "lock timeout",
    "canceling statement due to lock timeout",
)
_CONNECTION_TEXT = (
    "connection", "server closed", "terminating", "refused", "the database system is",
    "could not connect", "timeout expired", "no connection",
)


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


def is_connection_error(exc: BaseException) -> bool:
    text_ = str(getattr(exc, "orig", None) or exc).lower()
    return any(s in text_ for s in _CONNECTION_TEXT)


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The 503 error for an outage, without the driver's traceback text beyond 200 chars."""
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    return DatabaseUnavailable(f"database unavailable: {str(orig).strip()[:200]}")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, SQLAlchemyError | optuna.exceptions.StorageInternalError
                      | DatabaseUnavailable) and is_transient(exc)


def _give_up(state: RetryCallState) -> NoReturn:
    """Out of attempts (or time) on a transient error: DatabaseUnavailable, never a driver
    traceback."""
    assert state.outcome is not None
    exc = state.outcome.exception()
    assert exc is not None
    if isinstance(exc, DatabaseUnavailable):
        raise exc
    raise unavailable(exc) from exc


# The n-th pause is d + uniform(0, d) with d = min(RETRY_BASE_DELAY_S * 2**(n-1), max).
BACKOFF = (wait_exponential(multiplier=RETRY_BASE_DELAY_S, max=RETRY_MAX_DELAY_S)
           + wait_random_exponential(multiplier=RETRY_BASE_DELAY_S, max=RETRY_MAX_DELAY_S))

DB_RETRY = Retrying(
    retry=retry_if_exception(_retryable),
    wait=BACKOFF,
    stop=stop_after_attempt(RETRY_ATTEMPTS),
    retry_error_callback=_give_up,
)


class OutageBudget:
    """How long the calls of one Optuna storage ride out an outage: `seconds` from the first
    failure of the outage, shared by every call, so that once it is spent calls fail at once
    (DatabaseUnavailable) until one succeeds again (`clear`)."""

    def __init__(self, seconds: float, on_outage: Callable[[], None] = lambda: None) -> None:
        self.seconds = seconds
        self._on_outage = on_outage
        self._failing_since: float | None = None

    def left(self) -> float:
        if self._failing_since is None:
            return self.seconds
        return self.seconds - (time.monotonic() - self._failing_since)

    def _failed(self, _state: RetryCallState) -> None:
        self._on_outage()
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def _spent(self, _state: RetryCallState) -> bool:
        return self.left() <= 0

    def _wait(self, state: RetryCallState) -> float:
        return max(0.0, min(BACKOFF(state), self.left()))

    def clear(self) -> None:
        self._failing_since = None

    def policy(self) -> Retrying:
        """DB_RETRY with this budget for a stop, retrying any transient error."""
        return DB_RETRY.copy(retry=retry_if_exception(is_transient), stop=self._spent,
                             wait=self._wait, after=self._failed)
