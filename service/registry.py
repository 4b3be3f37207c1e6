"""Workers announce themselves here, so /metrics can tell live workers and their last beat."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import select

from service.db import Database
from service.models import WorkerRow, as_utc, utcnow
from service.retry import DB_RETRY

# A worker that has not been seen for this long counts as gone.
WORKER_LIVE_WINDOW_S = 60


def worker_seen(db: Database, name: str, state: str, trials_run: int) -> None:
    """Upsert this worker's row with the current time (called from the worker loop)."""
    def attempt() -> None:
        with db.session() as s:
            row = s.get(WorkerRow, name)
            if row is None:
                row = WorkerRow(name=name, hostname=socket.gethostname()[:200], pid=os.getpid(),
                                started_at=utcnow())
                s.add(row)
            row.last_seen = utcnow()
            row.state = state
            row.trials_run = trials_run
    DB_RETRY(attempt)


def live_workers(db: Database, window_s: float = WORKER_LIVE_WINDOW_S) -> list[WorkerRow]:
    """Workers seen within the window, stopped ones excluded."""
    since = utcnow() - timedelta(seconds=window_s)
    with db.session() as s:
        rows = list(s.scalars(select(WorkerRow).where(WorkerRow.state != "stopped")))
    return [r for r in rows if as_utc(r.last_seen) >= since]
