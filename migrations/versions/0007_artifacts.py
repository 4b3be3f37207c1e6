"""Artifacts: trial checkpoints and tuned models, with their owner, job and size.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hptune_artifacts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=False, index=True),
        sa.Column("owner", sa.String(100), nullable=False, index=True),
        sa.Column("trial_number", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("hptune_artifacts")
