"""A job's event stream (server-sent events): trial state changes and job status, resumable.

Each trial event carries an `id:`, the stream's cursor after that event: the highest trial
number sent, then each trial sent while still unfinished with the state it was sent in (`w`
WAITING, `r` RUNNING), as in `41.38r.40r`. Every trial numbered up to 41 and not listed was
sent in its final state. A client that reconnects with that cursor (the `Last-Event-ID`
header, as a browser's EventSource sends it, or `?after=`) gets exactly the changes it has
not seen: the trials numbered above 41, and 38 and 40 once their state differs from the
one sent; nothing twice and nothing left out. A bare trial number is a cursor too: the
trials after it.

A poll reads a bounded amount, however many trials the job has: the trials created since
the last one sent, a page of them at a time (the catch-up of a long job reads page after
page without waiting), and the watched ones, by index (service.trial_store's event
queries). `limit` caps the trial events of one connection: the stream then ends with a
`next` event naming the path that continues it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Header, Query
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select

from search import trial_to_dict
from service import trial_store
from service.db import Database
from service.errors import NotFound
from service.jobs import get_job, job_public
from service.retry import DB_RETRY
from service.status import TERMINAL

# Trial events one connection may be asked for (`?limit=`); without a limit a stream runs on.
MAX_EVENT_LIMIT = 10_000
# Trials one poll reads at most: a catch-up of 10,000 trials is 20 reads of this page.
EVENT_PAGE = 500
# Unfinished trials a cursor may name: more than a job's workers and queued retries. Past it
# the stream holds new unfinished trials back until some finish, so every id it sends parses.
MAX_OPEN = 1000
_MAX_NUMBER = 2**31 - 1
_LETTERS = {"WAITING": "w", "RUNNING": "r"}
CURSOR_PATTERN = r"^\d{1,10}(\.\d{1,10}[rw])*$"
MAX_CURSOR_CHARS = 11 + MAX_OPEN * 12
_CURSOR_RE = re.compile(CURSOR_PATTERN)
CURSOR_HELP = ("an event's id: every change after it, none twice (a trial number N: the "
               "trials after N)")


@dataclass
class Cursor:
    """What a stream has sent: the highest trial number, and the trials sent unfinished."""

    last: int = -1
    open: dict[int, str] = field(default_factory=dict)  # {number: "w" | "r"}

    def __str__(self) -> str:
        return str(self.last) + "".join(f".{n}{s}" for n, s in sorted(self.open.items()))

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor `text` names; ValueError, saying why, for anything else."""
        if len(text) > MAX_CURSOR_CHARS or not _CURSOR_RE.fullmatch(text):
            raise ValueError(f"not an event cursor ({CURSOR_HELP})")
        head, *rest = text.split(".")
        cursor = cls(int(head))
        if cursor.last > _MAX_NUMBER:
            raise ValueError(f"trial number above {_MAX_NUMBER}")
        if len(rest) > MAX_OPEN:
            raise ValueError(f"more than {MAX_OPEN} unfinished trials")
        for part in rest:
            n = int(part[:-1])
            if n > cursor.last or n in cursor.open:
                raise ValueError("an unfinished trial after the cursor's last, or twice")
            cursor.open[n] = part[-1]
        return cursor


def event_cursor(
    after: Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS, pattern=CURSOR_PATTERN,
                                       description=f"cursor: {CURSOR_HELP}")] = None,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=MAX_CURSOR_CHARS,
        description="the id of the last event received (EventSource sends it on "
                    "reconnecting); wins over `after`")] = None,
) -> Cursor | None:
    """The request's event cursor: Last-Event-ID when sent (a reconnecting EventSource sends
    it to the URL it first opened, whose `after` is older), else `after`; 422 naming the
    one that is not a cursor."""
    for loc, text in ((("header", "last-event-id"), last_event_id), (("query", "after"), after)):
        if text:
            try:
                return Cursor.parse(text)
            except ValueError as exc:
                raise RequestValidationError([{"loc": loc, "msg": str(exc),
                                               "type": "value_error"}]) from None
    return None


def key_revoked(db: Database, key_id: int) -> bool:
    """Whether API key `key_id` is revoked (or gone)."""
    from service.models import ApiKey

    with db.session() as s:
        row = s.execute(select(ApiKey.revoked_at).where(ApiKey.id == key_id)).first()
    return row is None or row.revoked_at is not None


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {json.dumps(data, default=str)}\n\n"


class EventPoller:
    """One connection's reads, a poll at a time (each in a worker thread): the events since
    the last poll, from where `cursor` points, at most `limit` trial events in all."""

    def __init__(self, db: Database, owner: str | None, job_id: int, key_id: int,
                 cursor: Cursor | None = None, limit: int | None = None,
                 path: str | None = None) -> None:
        self.db, self.owner, self.job_id, self.key_id = db, owner, job_id, key_id
        self.cursor = cursor or Cursor()
        self.limit, self.remaining = limit, limit
        self.path = path or f"/api/v1/jobs/{job_id}/events"
        self.anchor: tuple[int, int, dict[int, int]] | None = None  # study, after_id, open ids
        self.status: str | None = None

    @property
    def event_id(self) -> str | None:
        return str(self.cursor) if self.cursor.last >= 0 else None

    def next_event(self) -> str:
        """The stream's last event when it ends before the job does: where to go on."""
        query = {k: v for k, v in (("after", self.event_id), ("limit", self.limit)) if v}
        path = f"{self.path}?{urlencode(query)}" if query else self.path
        return sse("next", {"next": path}, self.event_id)

    def poll(self) -> tuple[list[str], bool, bool]:
        """(events, whether the stream is over, whether more trials wait to be read now).

        NotFound when the job (or its study) is gone."""
        if key_revoked(self.db, self.key_id):
            return [], True, False
        job = get_job(self.db, self.owner, self.job_id)
        status = job.status  # read before the trials: a final status covers what they show
        events: list[str] = []
        pending = more = False
        if job.study_name:
            pending, more = self._trial_events(job.study_name, events)
        done = status in TERMINAL and not pending
        if self.remaining == 0 and not done:
            return [*events, self.next_event()], True, False
        if status != self.status or done:
            self.status = status
            public = job_public(self.db, job)
            public.pop("spec")
            events.append(sse("job", public, self.event_id))
        return events, done, more

    def _trial_events(self, study_name: str, out: list[str]) -> tuple[bool, bool]:
        """Append the trial events of this poll; (whether changes are left unsent, whether
        a full page was read, so more can be read at once)."""
        if self.anchor is None:
            self.anchor = DB_RETRY(trial_store.event_anchor, self.db, study_name,
                                   self.cursor.last, list(self.cursor.open))
            if self.anchor is None:
                raise NotFound(f"job {self.job_id}'s study no longer exists")
            for n in set(self.cursor.open) - set(self.anchor[2]):
                del self.cursor.open[n]  # named trials that do not exist: nothing to watch
        study_id, after_id, open_ids = self.anchor
        page = EVENT_PAGE if self.remaining is None else min(EVENT_PAGE, self.remaining)
        new, watched = DB_RETRY(trial_store.trial_changes, self.db, study_id, after_id,
                                self.cursor.last, list(open_ids.values()), page)
        changed = [r for r in watched if _LETTERS.get(r.state) != self.cursor.open[r.number]]
        rows = self._admit(sorted([*changed, *new], key=lambda r: r.number))
        trials = DB_RETRY(trial_store.trials_by_id, self.db, [r.trial_id for r in rows])
        ids = {r.number: r.trial_id for r in rows}
        for t in trials:
            self._sent(t.number, ids[t.number], _LETTERS.get(t.state.name))
            out.append(sse("trial", trial_to_dict(t), self.event_id))
        if self.remaining is not None:
            self.remaining -= len(trials)
        full, cut = len(new) == page, len(rows) < len(changed) + len(new)
        return full or cut, full and not cut

    def _admit(self, rows: list[Any]) -> list[Any]:
        """The changes this poll sends, in number order: as many as the limit leaves, and
        new unfinished trials only while a cursor can name them."""
        n_open = len(self.cursor.open)
        out = []
        for r in rows:
            if self.remaining is not None and len(out) >= self.remaining:
                break
            was, now = self.cursor.open.get(r.number), _LETTERS.get(r.state)
            n_open += (now is not None) - (was is not None)
            if n_open > MAX_OPEN:
                break
            out.append(r)
        return out

    def _sent(self, number: int, trial_id: int, letter: str | None) -> None:
        """Record a trial event in the cursor (and where the next poll reads from)."""
        study_id, after_id, open_ids = self.anchor  # type: ignore[misc]
        if letter is None:
            self.cursor.open.pop(number, None)
            open_ids.pop(number, None)
        else:
            self.cursor.open[number] = letter
            open_ids[number] = trial_id
        if number > self.cursor.last:
            self.cursor.last = number
            self.anchor = (study_id, max(after_id, trial_id), open_ids)


async def event_stream(poller: EventPoller, poll_s: float, max_s: float
                       ) -> AsyncIterator[str]:
    """The poller's events as they come: a poll each `poll_s` (at once while a catch-up has
    more pages), holding no thread while it waits; after `max_s` it ends with a `next`."""
    import anyio

    deadline = time.monotonic() + max_s
    while True:
        try:
            events, over, more = await anyio.to_thread.run_sync(poller.poll)
        except NotFound:  # deleted while watched
            return
        for event in events:
            yield event
        if over:
            return
        if time.monotonic() >= deadline:
            yield poller.next_event()
            return
        if not more:
            yield ": keep-alive\n\n"
            await anyio.sleep(poll_s)
