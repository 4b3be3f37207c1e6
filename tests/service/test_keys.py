"""service/keys.py on a real SQLite file: what is stored of a key, and which owners exist."""

from __future__ import annotations

import pytest

from service.db import Database
from service.keys import authenticate, create_key, list_keys
from service.migrate import upgrade
from service.settings import Settings


@pytest.fixture
def db(tmp_path):
    database = Database(Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}"), role="test")
    upgrade(database)
    yield database
    database.dispose()


def test_no_character_of_the_secret_is_stored(db):
    with db.session() as s:
        row, secret = create_key(s, "alice")
        stored = (row.prefix, row.key_hash)
    body = secret.removeprefix("hpt_")
    for value in stored:
        # Not even a few characters of the secret: any 4-character window of it.
        assert not any(body[i:i + 4] in value for i in range(len(body) - 3)), value
    with db.session() as s:
        assert authenticate(s, secret).owner == "alice"
        assert [k.prefix for k in list_keys(s)] == [stored[0]]


@pytest.mark.parametrize("owner", ["evil\u202eexe.txt", "zero\u200bwidth", "two\nlines",
                                   "", "x" * 101])
def test_owner_names_refuse_control_and_format_characters(db, owner):
    with db.session() as s, pytest.raises(ValueError, match="owner"):
        create_key(s, owner)


def test_the_upgrade_replaces_stored_secret_prefixes(tmp_path):
    """Keys made before the fingerprint kept the secret's first characters: the migration
    rewrites them."""
    from alembic import command
    from sqlalchemy import text

    from service.keys import fingerprint, hash_key
    from service.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    database = Database(Settings(database_url=url), role="test")
    cfg = alembic_config(url)
    secret = "hpt_" + "s3cretpart" * 4
    with database.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(text("INSERT INTO hptune_api_keys (owner, key_hash, prefix, is_admin, "
                          "created_at) VALUES ('old', :h, :p, 0, '2026-01-01')"),
                     {"h": hash_key(secret), "p": secret[:10]})
    upgrade(database)
    with database.session() as s:
        (row,) = list_keys(s)
    assert row.prefix == fingerprint(hash_key(secret)) and "s3cr" not in row.prefix
    database.dispose()


def test_verified_keys_are_kept_for_their_ttl_and_no_longer():
    from service.errors import Unauthorized
    from service.keys import VerifiedKeys

    now = [100.0]
    keys = VerifiedKeys(ttl_s=1.0, clock=lambda: now[0])
    lookups = []

    def lookup(key):
        lookups.append(key)
        if key != "good":
            raise Unauthorized("invalid or revoked API key")
        return f"row-{len(lookups)}"

    assert keys.verify("good", lookup) == "row-1"
    now[0] += 0.99
    assert keys.get("good") == "row-1" and keys.verify("good", lookup) == "row-1"
    now[0] += 0.01  # 1.0 s after the lookup began: looked up again
    assert keys.get("good") is None and keys.verify("good", lookup) == "row-2"
    with pytest.raises(Unauthorized):
        keys.verify("bad", lookup)
    assert len(keys) == 1 and lookups == ["good", "good", "bad"]
    off = VerifiedKeys(ttl_s=0)
    assert off.verify("good", lookup) == "row-4" and off.verify("good", lookup) == "row-5"
    assert len(off) == 0


def test_hostile_keys_cannot_grow_the_verified_keys():
    from service.errors import Unauthorized
    from service.keys import VerifiedKeys

    keys = VerifiedKeys(ttl_s=60, max_keys=100)

    def lookup(key):
        if not key.startswith("good-"):
            raise Unauthorized("invalid or revoked API key")
        return key

    for i in range(5000):  # unknown keys are looked up every time and never kept
        with pytest.raises(Unauthorized):
            keys.verify(f"forged-{i}", lookup)
    assert len(keys) == 0
    for i in range(1000):  # valid keys past the bound push the least recent out
        keys.verify(f"good-{i}", lookup)
    assert len(keys) == 100 and keys.get("good-999") and keys.get("good-899") is None


@pytest.fixture
def app(tmp_path):
    from starlette.testclient import TestClient

    from service.api import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'app.db'}",
                        key_cache_seconds=0.5)
    database = Database(settings, role="test")
    upgrade(database)
    with TestClient(create_app(settings, database)) as client:
        yield client, database
    database.dispose()


def test_a_revoked_key_is_refused_within_the_cache_bound(app):
    """Requests that start HPTUNE_KEY_CACHE_SECONDS after the revocation or later answer
    401: the bound the README states. Polled, with a deadline, never a fixed sleep."""
    import time

    from service.keys import revoke_key

    client, database = app
    with database.session() as s:
        row, key = create_key(s, "alice")
        key_id = row.id
    h = {"Authorization": f"Bearer {key}"}
    assert client.get("/api/v1/jobs", headers=h).status_code == 200
    with database.session() as s:
        revoke_key(s, key_id)
    revoked = time.monotonic()
    ttl = client.app.state.verified_keys.ttl_s
    while True:
        started = time.monotonic()
        r = client.get("/api/v1/jobs", headers=h)
        if r.status_code == 401:
            break
        assert r.status_code == 200 and started - revoked < ttl, (
            f"a request {started - revoked:.2f} s after the revocation still passed")
        assert time.monotonic() - revoked < ttl + 30, "the key was never refused"
        time.sleep(0.02)
    assert r.headers["www-authenticate"] == "Bearer"


def test_forged_keys_leave_the_api_s_verified_keys_alone(app):
    import secrets

    client, database = app
    with database.session() as s:
        _, key = create_key(s, "alice")
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}
                      ).status_code == 200
    for _ in range(200):
        forged = "hpt_" + secrets.token_urlsafe(32)
        r = client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
    assert len(client.app.state.verified_keys) == 1
