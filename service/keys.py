"""API keys: created once, stored hashed, looked up by hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from search.spec import control_character
from service.errors import NotFound, Unauthorized
from service.models import ApiKey, utcnow

KEY_PREFIX = "hpt_"
# Keys an API process keeps as verified (VerifiedKeys): the least recently verified go first.
MAX_VERIFIED_KEYS = 1024


def hash_key(key: str) -> str:
    """SHA-256 of a key: keys are long random secrets, so a fast hash is the right tool."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(key_hash: str) -> str:
    """How listings tell keys apart: the start of the key's hash, none of the secret."""
    return "#" + key_hash[:8]


def create_key(session: Session, owner: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key for `owner`; the secret is returned here and never again."""
    if not owner or len(owner) > 100:
        raise ValueError("owner must be 1 to 100 characters")
    bad = control_character(owner)
    if bad is not None:
        raise ValueError(f"owner must not contain control or format characters (found {bad})")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hash_key(secret)
    row = ApiKey(owner=owner, key_hash=digest, prefix=fingerprint(digest), is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, secret


def authenticate(session: Session, key: str) -> ApiKey:
    """The live key matching `key`, or Unauthorized."""
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthorized("invalid or revoked API key")
    return row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    row.revoked_at = row.revoked_at or utcnow()
    return row


class VerifiedKeys:
    """Keys verified in the last `ttl_s` seconds, so that a burst of requests with one key
    costs one lookup (HPTUNE_KEY_CACHE_SECONDS; 0 looks up every request).

    The bound: a key revoked (or replaced) in the database is refused by this process at most
    `ttl_s` seconds after the lookup that last verified it, so at most `ttl_s` after the
    revocation commits. Only verified keys go in, by their hash (no secret is held), at most
    `max_keys` of them, the least recently verified out first: unknown or forged keys are
    looked up every time and never stored, so no client can grow it.
    """

    def __init__(self, ttl_s: float, max_keys: int = MAX_VERIFIED_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be at least 0, got {ttl_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, tuple[ApiKey, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key: str) -> ApiKey | None:
        """The key's row if it was verified less than `ttl_s` ago, else None. Never blocks
        on the database: the API's key check calls it in the event loop."""
        if self.ttl_s == 0:
            return None
        digest = hash_key(key)
        with self._lock:
            hit = self._keys.get(digest)
            if hit is None:
                return None
            if self._clock() >= hit[1]:
                del self._keys[digest]
                return None
            return hit[0]

    def verify(self, key: str, lookup: Callable[[str], ApiKey]) -> ApiKey:
        """The key's row, from here or from `lookup(key)` (which raises for a bad key); a row
        looked up is kept until `ttl_s` after the lookup began."""
        row = self.get(key)
        if row is not None:
            return row
        started = self._clock()
        row = lookup(key)
        if self.ttl_s > 0:
            digest = hash_key(key)
            with self._lock:
                self._keys[digest] = (row, started + self.ttl_s)
                self._keys.move_to_end(digest)
                while len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
        return row
