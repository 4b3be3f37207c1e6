"""Idempotency-Key on the creating POSTs: a retried submission never makes a second object.

A client sends `Idempotency-Key: <string>` (a UUID, say) with `POST /api/v1/jobs` or
`POST /api/v1/datasets`, as the IETF httpapi draft "The Idempotency-Key HTTP Header Field"
describes, and may send the same request again after a timeout or a lost connection: for
HPTUNE_IDEMPOTENCY_SECONDS its owner gets the first answer (its status and body, marked
`Idempotent-Replayed: true`) and no second job or dataset is made.

Keys live in the database (hptune_idempotency_keys, unique per owner and key), so every API
process honours them. A request takes its key under the owner's lock (db.owner_session):

- no live row: it inserts one, `pending`, with a random attempt token, and goes on;
- a row of another request (another fingerprint): 422;
- a `done` row: the stored answer;
- a `pending` row taken less than LEASE_S ago: 409 with Retry-After, the first request is
  still in progress;
- an older `pending` row: its holder is presumed dead and the request takes the key over (a
  new token). If the holder had stored its object, that object is the answer; else the
  request makes it.

The object's row and the key's `resource_id` are written in one transaction, and only by the
request holding the key's current token (Claim.record); a request that lost its key to a
takeover rolls its insert back (409). So whoever dies when, and whoever takes over, one key
makes at most one object. A request that fails gives its key back, so the client may retry
with it, unless its object was stored after all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError

from search import JobSpec
from service import datasets, jobs
from service.db import Database
from service.errors import Conflict, InvalidSpec, NotFound
from service.models import IdempotencyKey, Job, UploadedDataset, as_utc, utcnow
from service.retry import DB_RETRY
from service.schemas import DatasetPublic, JobPublic

log = logging.getLogger("hptune.idempotency")

HEADER = "Idempotency-Key"
# Sent with an answer that was stored for an earlier request with the same key.
REPLAYED_HEADER = "Idempotent-Replayed"
# Longest key, in characters (a UUID has 36); the column holds as many.
KEY_MAX_CHARS = 255
# Printable ASCII without a space at either end (servers strip those anyway) and not starting
# with a double quote; or a structured-field string as the draft writes keys ("..." of
# printable ASCII, with only \" and \\ escaped).
KEY_PATTERN = r'^(?:[!#-~](?:[ -~]*[!-~])?|"(?:[ !#-\[\]-~]|\\["\\])+")$'
KEY_DESCRIPTION = (
    "A string you choose per submission (a UUID, say), 1 to 255 printable ASCII characters; a "
    'value in double quotes is read as a structured-field string ("...", its quotes removed). '
    "Sending the same request again with the same key within HPTUNE_IDEMPOTENCY_SECONDS "
    "(24 h by default) answers what the first request answered, with "
    "`Idempotent-Replayed: true`, and creates nothing; the same key with a different request "
    "answers 422; while the first request is still in progress, 409 with Retry-After. Keys "
    "are per owner.")
# Seconds a request holds its key before another request with the key may take it over:
# longer than any creation takes, so only a holder that died loses its key.
LEASE_S = 60.0
# Seconds between two purges of every owner's expired keys by one process (each request
# deletes its own owner's expired keys at once).
PURGE_INTERVAL_S = 60.0
CREATED = 201

_SF_ESCAPE = re.compile(r'\\(["\\])')


class KeyStatus(StrEnum):
    """Where a key's request stands."""

    PENDING = "pending"  # a request holds it
    DONE = "done"  # the answer is stored


class RequestInProgress(Conflict):
    """A request with the same key is still being processed; the client should try again."""

    retry_after_s = 1


@dataclass(frozen=True)
class Outcome:
    """What a keyed POST answers: a fresh creation's, or the stored one (`replayed`)."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


def _bad_key(why: str) -> InvalidSpec:
    return InvalidSpec(f"{HEADER} must be {why}", field=HEADER)


def parse_key(value: str | None) -> str | None:
    """The key an Idempotency-Key header value names (None without the header).

    InvalidSpec (422 naming the header) unless it is 1 to KEY_MAX_CHARS printable ASCII
    characters. A value in double quotes is read as a structured-field string, as the draft
    writes it: its quotes and backslash escapes are removed.
    """
    if value is None:
        return None
    if not value:
        raise _bad_key("a non-empty string")
    if len(value) > KEY_MAX_CHARS:
        raise _bad_key(f"at most {KEY_MAX_CHARS} characters (got {len(value)})")
    if not re.fullmatch(KEY_PATTERN, value):
        raise _bad_key('printable ASCII characters (no control characters, no space at either '
                       'end), or a non-empty double-quoted string with only \\" and \\\\ '
                       "escaped")
    if value.startswith('"'):
        value = _SF_ESCAPE.sub(r"\1", value[1:-1])
    return value


def fingerprint(scope: str, *parts: str | bytes | None) -> str:
    """SHA-256 of a request: its scope (method and path) and its parts, each length-prefixed
    so that no two different requests share a fingerprint by moving bytes between parts."""
    h = hashlib.sha256(scope.encode())
    for part in parts:
        if part is None:
            h.update(b"\x00")
            continue
        data = part.encode() if isinstance(part, str) else part
        h.update(b"\x01" + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def job_fingerprint(spec: JobSpec) -> str:
    """A job submission's fingerprint: its validated spec as canonical JSON, so the same job
    written with other spacing, key order or defaults spelt out is the same request."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"))
    return fingerprint("POST /api/v1/jobs", canonical)


def dataset_fingerprint(raw: bytes, filename: str, target: str | None, name: str | None
                        ) -> str:
    """An upload's fingerprint: the file's bytes, its file name, target and name."""
    return fingerprint("POST /api/v1/datasets", raw, filename, target, name)


@dataclass(frozen=True)
class Claim:
    """A request's hold on its key row (`attempt` is its token)."""

    db: Database
    row_id: int
    attempt: str
    # The object a dead holder stored, when this request took the key over.
    resource_id: int | None = None

    def record(self, session: Any, resource_id: int) -> None:
        """Note the new object's id on the key, in the transaction that inserts the object.

        Only while this request still holds the key; otherwise RequestInProgress, which rolls
        the insert back: the request that took the key over makes (or made) the object.
        """
        done = session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.id == self.row_id, IdempotencyKey.attempt == self.attempt,
                   IdempotencyKey.resource_id.is_(None))
            .values(resource_id=resource_id)).rowcount
        if done != 1:
            raise RequestInProgress(f"another request with this {HEADER} took it over while "
                                    "this one ran; send it again for that request's answer")


def submit_job(db: Database, owner: str, spec: JobSpec, key: str | None) -> Outcome:
    """POST /api/v1/jobs with an optional idempotency key (as parse_key returned it)."""

    def create(on_insert: Callable[[Any, int], None] | None) -> dict[str, Any]:
        return _job_body(db, jobs.create_job(db, owner, spec, on_insert=on_insert))

    def recover(job_id: int) -> dict[str, Any]:
        return _job_body(db, jobs.get_job(db, owner, job_id))

    return _run(db, owner, key, lambda: job_fingerprint(spec), create, recover, Job)


def upload_dataset(db: Database, owner: str, filename: str, raw: bytes, target: str | None,
                   name: str | None, key: str | None) -> Outcome:
    """POST /api/v1/datasets with an optional idempotency key (as parse_key returned it)."""

    def create(on_insert: Callable[[Any, int], None] | None) -> dict[str, Any]:
        row = datasets.create_dataset(db, owner, filename, raw, target, name,
                                      on_insert=on_insert)
        return _dataset_body(row)

    def recover(dataset_id: int) -> dict[str, Any]:
        return _dataset_body(datasets.get_dataset(db, owner, dataset_id))

    return _run(db, owner, key, lambda: dataset_fingerprint(raw, filename, target, name),
                create, recover, UploadedDataset)


def _job_body(db: Database, job: Job) -> dict[str, Any]:
    return JobPublic.model_validate(jobs.job_public(db, job)).model_dump(mode="json")


def _dataset_body(row: UploadedDataset) -> dict[str, Any]:
    return DatasetPublic.model_validate(datasets.dataset_public(row)).model_dump(mode="json")


def _run(db: Database, owner: str, key: str | None, request_fingerprint: Callable[[], str],
         create: Callable[[Callable[[Any, int], None] | None], dict[str, Any]],
         recover: Callable[[int], dict[str, Any]], model: type[Job | UploadedDataset]
         ) -> Outcome:
    if key is None:
        return Outcome(CREATED, create(None))
    _purge_now_and_then(db)
    taken = _take(db, owner, key, request_fingerprint())
    if isinstance(taken, Outcome):
        return taken
    claim = taken
    if claim.resource_id is not None:
        # The dead holder stored its object: that object, as it is now, is the answer.
        try:
            body = recover(claim.resource_id)
        except NotFound:
            _forget_resource(claim)  # gone since (its creation was undone): make it anew
        else:
            _store(claim, body)
            return Outcome(CREATED, body, replayed=True)
    try:
        body = create(claim.record)
    except BaseException:
        _give_back(claim, model)
        raise
    _store(claim, body)
    return Outcome(CREATED, body)


def _expired(now: datetime, retention_s: int) -> ColumnElement[bool]:
    # The current setting counts too: shortening HPTUNE_IDEMPOTENCY_SECONDS applies at once.
    return or_(IdempotencyKey.expires_at <= now,
               IdempotencyKey.created_at <= now - timedelta(seconds=retention_s))


def _take(db: Database, owner: str, key: str, fp: str) -> Claim | Outcome:
    """The key for this request (a Claim), or the stored answer; 422 for another request's
    key, 409 while another request holds it."""
    now = utcnow()
    retention_s = db.settings.idempotency_seconds
    token = secrets.token_hex(16)
    with db.owner_session(owner) as s:
        # An expired key is a new key: the owner's expired rows go first.
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                               _expired(now, retention_s)))
        row = s.scalar(select(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                    IdempotencyKey.key == key))
        if row is None:
            row = IdempotencyKey(owner=owner, key=key, fingerprint=fp,
                                 status=KeyStatus.PENDING, attempt=token, locked_at=now,
                                 created_at=now,
                                 expires_at=now + timedelta(seconds=retention_s))
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # only without the owner's lock; the other one holds it
                raise RequestInProgress(f"a request with this {HEADER} is in progress; "
                                        "try again shortly") from None
            return Claim(db, row.id, token)
        if row.fingerprint != fp:
            raise InvalidSpec(f"this {HEADER} was already used for a different request (another "
                              "body or endpoint); use a new key for a new request", field=HEADER)
        if row.status == KeyStatus.DONE and row.response_status is not None:
            return Outcome(row.response_status, row.response or {}, replayed=True)
        held_s = (now - as_utc(row.locked_at)).total_seconds()
        if held_s < LEASE_S:
            raise RequestInProgress(f"a request with this {HEADER} is still in progress; try "
                                    "again shortly for its answer")
        log.warning("idempotency key %s of %s: its request held it for %.0f s without an "
                    "answer; taking it over", row.id, owner, held_s)
        row.attempt, row.locked_at = token, now
        return Claim(db, row.id, token, row.resource_id)


def _holding(claim: Claim) -> ColumnElement[bool]:
    return (IdempotencyKey.id == claim.row_id) & (IdempotencyKey.attempt == claim.attempt)


def _store(claim: Claim, body: dict[str, Any]) -> None:
    """Store the answer. If that fails, the object stands and a retry after LEASE_S gets it
    (recover), so the request still answers with it."""

    def attempt() -> None:
        with claim.db.session() as s:
            s.execute(update(IdempotencyKey).where(_holding(claim)).values(
                status=KeyStatus.DONE, response_status=CREATED, response=body))

    try:
        DB_RETRY(attempt)
    except Exception as exc:
        log.warning("idempotency key %s: could not store its answer (%s); a retry recovers it",
                    claim.row_id, exc)


def _forget_resource(claim: Claim) -> None:
    with claim.db.session() as s:
        s.execute(update(IdempotencyKey).where(_holding(claim)).values(resource_id=None))


def _give_back(claim: Claim, model: type[Job | UploadedDataset]) -> None:
    """After a failed request: delete its key so a retry starts afresh, unless its object was
    stored after all (a creation that could not be undone): then a retry gets that object."""
    stored = exists().where(model.id == IdempotencyKey.resource_id)

    def attempt() -> None:
        with claim.db.session() as s:
            s.execute(delete(IdempotencyKey).where(
                _holding(claim), or_(IdempotencyKey.resource_id.is_(None), ~stored)))

    try:
        DB_RETRY(attempt)
    except Exception as exc:
        log.warning("idempotency key %s: could not give it back (%s); a retry may take it "
                    "over after %.0f s", claim.row_id, exc, LEASE_S)


def purge_expired(db: Database) -> int:
    """Delete every owner's expired keys; returns how many went."""
    with db.session() as s:
        return s.execute(delete(IdempotencyKey).where(
            _expired(utcnow(), db.settings.idempotency_seconds))).rowcount


_last_purge: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()
_purge_mutex = threading.Lock()


def _purge_now_and_then(db: Database) -> None:
    """purge_expired at most every PURGE_INTERVAL_S per process; a failure only waits for the
    next time (the request goes on: its own owner's expired keys go in _take anyway)."""
    now = time.monotonic()
    with _purge_mutex:
        last = _last_purge.get(db)
        if last is not None and now - last < PURGE_INTERVAL_S:
            return
        _last_purge[db] = now
    try:
        n = purge_expired(db)
    except Exception as exc:
        log.warning("purging expired idempotency keys failed: %s", exc)
        return
    if n:
        log.info("purged %d expired idempotency keys", n)
