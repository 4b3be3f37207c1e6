"""Key listings show a fingerprint of the key's hash, no longer the secret's first characters.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # service.keys.fingerprint: "#" and the first 8 hex digits of the SHA-256 key hash.
    op.execute(sa.text("UPDATE hptune_api_keys SET prefix = '#' || substr(key_hash, 1, 8)"))


def downgrade() -> None:
    # The secret's characters are gone for good; listings keep the fingerprint.
    pass
