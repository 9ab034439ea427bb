"""Submissions' idempotency keys (`Idempotency-Key`), each with the job it created and a
hash of what was submitted, kept a day: a submission retried with its key returns the
first one's job instead of creating another.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import UTCDateTime

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_idempotency_keys",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_job_idempotency_keys_created", "job_idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_job_idempotency_keys_created", table_name="job_idempotency_keys")
    op.drop_table("job_idempotency_keys")
