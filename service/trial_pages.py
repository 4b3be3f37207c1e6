"""GET /api/v1/jobs/{id}/trials as JSON bytes, its finished trials from a per-process cache.

A COMPLETE or PRUNED trial never changes again: Optuna refuses every write to a finished trial
(UpdateFinishedTrialError), and hptune writes its attributes before telling it. So the JSON of
such a trial, once built, is kept (TrialJsonCache) and a page of them costs one query, for
the page's rows, instead of reading every parameter, value and attribute and presenting them
again (~0.3 ms a trial). Running, waiting and failed trials are read afresh every time (a
failed one may be retried later, which its `details.retried_as` shows).

The bytes are those FastAPI would send for the route's response_model: each trial's JSON is
TrialPublic's, validated and dumped by pydantic, and a page's is TrialsPublic's with them
inside (tests/service/test_trial_pages.py compares the two).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from optuna.trial import FrozenTrial
from pydantic import TypeAdapter

from search import trial_to_dict
from service import trial_store
from service.db import Database
from service.errors import NotFound
from service.jobs import StudyMissing
from service.retry import DB_RETRY
from service.schemas import TrialPublic, TrialsPublic

# Trial states whose JSON never changes once a trial has one of them.
FINAL_STATES = ("COMPLETE", "PRUNED")
# Bytes of trial JSON an API process keeps (about 50,000 trials of a dozen epochs).
MAX_CACHED_BYTES = 32 << 20
# Trials a page reads and presents afresh at most (about 0.1 ms each): a page of trials this
# process has not presented yet ends there and its `next` goes on, so that a cold page of the
# largest `limit` costs what a page of this many does.
MAX_PRESENTED_PER_PAGE = 250
# What an entry costs besides its JSON (its key tuple and the dict's slot), counted against
# MAX_CACHED_BYTES too, so that many tiny trials cannot exceed the bound.
ENTRY_OVERHEAD_BYTES = 300

_TRIAL = TypeAdapter(TrialPublic)
_PAGE = TypeAdapter(TrialsPublic)
_EMPTY_DATA = b'{"data":[]'


class TrialJsonCache:
    """The JSON of finished trials, least recently used out first past `max_bytes`."""

    def __init__(self, max_bytes: int = MAX_CACHED_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: list[Hashable]) -> list[bytes | None]:
        """The JSON kept for each key, or None; under one hold of the lock."""
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                body = self._entries.get(key)
                if body is not None:
                    self._entries.move_to_end(key)
                out.append(body)
        return out

    def put(self, key: Hashable, body: bytes) -> None:
        cost = len(body) + ENTRY_OVERHEAD_BYTES
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= len(old) + ENTRY_OVERHEAD_BYTES
            self._entries[key] = body
            self.bytes += cost
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= len(dropped) + ENTRY_OVERHEAD_BYTES


def trial_json(trial: FrozenTrial, retried_as: int | None = None) -> bytes:
    """One trial as the REST API sends it (TrialPublic's JSON of search.trial_to_dict)."""
    return _TRIAL.dump_json(_TRIAL.validate_python(trial_to_dict(trial, retried_as)),
                            by_alias=True)


def page_body(trials: list[bytes], count: int, next_link: str | None) -> bytes:
    """A TrialsPublic page's JSON around the trials' own."""
    rest = _PAGE.dump_json(TrialsPublic(data=[], count=count, next=next_link), by_alias=True)
    assert rest.startswith(_EMPTY_DATA)
    return b'{"data":[' + b",".join(trials) + b"]" + rest[len(_EMPTY_DATA):]


def _cache_key(study_name: str, study_id: int, e: trial_store.PageEntry) -> Hashable:
    # The trial's row, whole: a trial id that SQLite hands out again after a job was deleted
    # comes with another study, number or times, so it never meets the old trial's JSON.
    return (e.trial_id, study_id, study_name, e.number, e.state, e.datetime_start,
            e.datetime_complete)


def trials_page(db: Database, owner: str | None, job_id: int, after: int | None, limit: int,
                cache: TrialJsonCache) -> tuple[list[bytes], int, int | None]:
    """The JSON of at most `limit` of the job's trials numbered above `after`, in number
    order (fewer when more than MAX_PRESENTED_PER_PAGE of them are not cached); the job's
    trial count; and the number of the page's last trial if more follow (None on the last
    page). As jobs.job_trials_page (NotFound and StudyMissing alike),
    with the job's row and the page's in one query, and finished trials from `cache`."""
    page = DB_RETRY(trial_store.job_page_index, db, job_id, -1 if after is None else after,
                    limit + 1)
    if page is None or (owner is not None and page.owner != owner):
        raise NotFound(f"no job {job_id}")  # as get_job: another owner's job is missing
    if not page.study_name:
        return [], 0, None
    name, index = page.study_name, page.index
    if index is None:  # a study deleted outside hptune is a 404, as load_job_study says
        raise StudyMissing(f"job {job_id}'s study {name!r} no longer exists "
                           "(deleted or renamed outside hptune)")
    entries = index.entries[:limit]
    final = [e for e in entries if e.state in FINAL_STATES]
    found = {e.trial_id: body for e, body in zip(
        final, cache.get_many([_cache_key(name, index.study_id, e) for e in final]),
        strict=True) if body is not None}
    missing = [e for e in entries if e.trial_id not in found]
    more = len(index.entries) > limit
    if len(missing) > MAX_PRESENTED_PER_PAGE:
        # A cold page's work is bounded: it ends before the first trial past the bound, and
        # `next` goes on from there (the page holds fewer than `limit` trials).
        cut = missing[MAX_PRESENTED_PER_PAGE].number
        entries = [e for e in entries if e.number < cut]
        missing, more = missing[:MAX_PRESENTED_PER_PAGE], True
    if missing:
        found.update(_present(db, name, index.study_id, missing, cache))
    last = entries[-1].number if more else None
    return [found[e.trial_id] for e in entries], index.total, last


def _present(db: Database, study_name: str, study_id: int,
             entries: list[trial_store.PageEntry], cache: TrialJsonCache) -> dict[int, bytes]:
    """Read and present `entries`' trials; keep the JSON of the finished ones."""
    trials, retried_as = DB_RETRY(trial_store.page_trials, db, study_name, entries)
    out: dict[int, Any] = {}
    for e, t in zip(entries, trials, strict=True):
        body = out[e.trial_id] = trial_json(t, retried_as.get(t.number))
        if e.state in FINAL_STATES:
            cache.put(_cache_key(study_name, study_id, e), body)
    return out
