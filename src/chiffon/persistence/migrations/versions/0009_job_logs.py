"""Jobs' output: a bounded tail of each attempt's log, shipped by its agent in chunks;
and the most VRAM each attempt's processes held.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import JsonDocument

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_logs",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("offset", sa.BigInteger(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(sa.Column("peak_vram_gb", JsonDocument, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_column("peak_vram_gb")
    op.drop_table("job_logs")
