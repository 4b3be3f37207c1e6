"""API keys: created once, stored hashed, looked up by hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from search.spec import control_character
from service.errors import NotFound, Unauthorized
from service.models import ApiKey, utcnow

KEY_PREFIX = "hpt_"


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
