"""Dashboard logins: a random session id in the browser's cookie, only its hash in the database."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from service.db import Database
from service.keys import authenticate, hash_key
from service.models import ApiKey, DashboardSession, as_utc, utcnow


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard: an owner sees their studies, an admin every study."""

    owner: str
    is_admin: bool

    @property
    def scope(self) -> str | None:
        """The owner whose studies this viewer sees; None for every owner's."""
        return None if self.is_admin else self.owner


def key_viewer(db: Database, key: str) -> Viewer:
    """The viewer of a live API key, or Unauthorized."""
    with db.session() as s:
        row = authenticate(s, key)
        return Viewer(row.owner, row.is_admin)


def create_session(db: Database, key: str, ttl_s: int) -> tuple[str, Viewer, datetime]:
    """Log `key` in: (session id, viewer, expiry). Unauthorized for an unknown or revoked key."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with db.session() as s:
        row = authenticate(s, key)
        # Expired sessions go when someone logs in, so the table holds live ones and a few.
        s.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
        s.add(DashboardSession(id_hash=hash_key(session_id), key_id=row.id, owner=row.owner,
                               is_admin=row.is_admin, created_at=now, expires_at=expires))
        viewer = Viewer(row.owner, row.is_admin)
    return session_id, viewer, expires


def session_viewer(db: Database, session_id: str) -> Viewer | None:
    """The viewer of a live session; None if it is unknown, expired, or its key was revoked."""
    with db.session() as s:
        found = s.execute(
            select(DashboardSession, ApiKey.revoked_at)
            .join(ApiKey, ApiKey.id == DashboardSession.key_id)
            .where(DashboardSession.id_hash == hash_key(session_id))).first()
        if found is None:
            return None
        row, revoked_at = found
        if revoked_at is not None or as_utc(row.expires_at) <= utcnow():
            s.delete(row)
            return None
        return Viewer(row.owner, row.is_admin)


def end_session(db: Database, session_id: str) -> None:
    """Log out: the session id is worthless from now on."""
    with db.session() as s:
        s.execute(delete(DashboardSession)
                  .where(DashboardSession.id_hash == hash_key(session_id)))
