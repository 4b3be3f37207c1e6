"""Job stats: an ended job's trial counts, duration histogram and epochs saved, kept so that
/metrics sums them in one aggregate instead of reading every trial (service/metrics.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# service.models.DURATION_BUCKETS_S as column names; changing the buckets needs a migration.
BUCKET_COLUMNS = ("le_0_5s", "le_1s", "le_2s", "le_5s", "le_10s", "le_30s", "le_60s",
                  "le_120s", "le_300s", "le_600s", "le_1800s", "le_3600s")


def upgrade() -> None:
    op.create_table(
        "hptune_job_stats",
        sa.Column("job_id", sa.Integer, primary_key=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("complete", sa.Integer, nullable=False),
        sa.Column("pruned", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("durations", sa.Integer, nullable=False),
        sa.Column("duration_sum", sa.Float, nullable=False),
        *(sa.Column(name, sa.Integer, nullable=False) for name in BUCKET_COLUMNS),
        sa.Column("saved_pruned", sa.Float, nullable=False),
        sa.Column("saved_early_stopped", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hptune_job_stats")
