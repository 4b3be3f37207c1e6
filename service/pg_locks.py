"""PostgreSQL advisory locks held until a transaction ends, waited for in one of two ways.

Straight to PostgreSQL, a waiter blocks in the server (`pg_advisory_xact_lock`, first come
first served, bounded by `lock_timeout`). Behind a transaction pooler
(`HPTUNE_DATABASE_POOLER=transaction`, e.g. PgBouncer with `pool_mode = transaction`) a
waiter blocked in the server would hold one of the pooler's few server connections for as
long as it waits: with as many waiters as server connections, the holder could not get the
connection it needs to count and create its trial, and everything would stall until the
lock timeout. There a waiter polls `pg_try_advisory_xact_lock` and ends its transaction
between tries (capped exponential backoff with jitter), so only holders keep a server
connection. hptune uses no session-level lock: behind a transaction pooler a session lock
stays with whichever server connection took it, not with the client that asked.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from sqlalchemy import Connection, text

from service.errors import DatabaseUnavailable

# Longest wait for another process's hold on a lock (either way of waiting).
LOCK_TIMEOUT_MS = 30_000
# Polled waits (behind a transaction pooler): the first pause between two tries and the cap.
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.1


def take_xact_lock(connection: Callable[[], Connection], rollback: Callable[[], None],
                   keys: tuple[int, ...], *, poll: bool, what: str) -> None:
    """Take the advisory lock `keys` (one bigint, or two ints) in the transaction of
    `connection()`, held until that transaction ends.

    `poll`: try without waiting in the server; after a miss, `rollback()` ends the
    transaction and the next `connection()` begins another. Past LOCK_TIMEOUT_MS it gives up:
    the server's lock-timeout error, or DatabaseUnavailable naming `what` when polling.
    """
    args = ", ".join(f"CAST(:k{i} AS {'bigint' if len(keys) == 1 else 'int'})"
                     for i in range(len(keys)))
    params = {f"k{i}": k for i, k in enumerate(keys)}
    if not poll:
        conn = connection()
        conn.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
        conn.execute(text(f"SELECT pg_advisory_xact_lock({args})"), params)
        return
    deadline = time.monotonic() + LOCK_TIMEOUT_MS / 1000
    delay = POLL_FIRST_S
    try_lock = text(f"SELECT pg_try_advisory_xact_lock({args})")
    while not connection().execute(try_lock, params).scalar():
        rollback()  # the pooler takes its server connection back while this one waits
        if time.monotonic() >= deadline:
            raise DatabaseUnavailable(f"database unavailable: lock timeout: {what} still "
                                      f"held by another process after {LOCK_TIMEOUT_MS} ms")
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, POLL_MAX_S)
