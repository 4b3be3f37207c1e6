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
