"""Jobs: the queue, attempts, live claims and job events; agents say whether they take jobs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import JsonDocument, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("agent_registry") as batch:
        batch.add_column(
            sa.Column("accepts_jobs", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("spec", JsonDocument, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retries_used", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=True),
        sa.Column("cancel_requested_at", UTCDateTime(), nullable=True),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
    )
    op.create_index("ix_jobs_state_submitted", "jobs", ["state", "submitted_at"])
    op.create_index("ix_jobs_agent_state", "jobs", ["agent_id", "state"])
    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("gpu_uuids", JsonDocument, nullable=False),
        sa.Column("assigned_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("signal", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(1000), nullable=False),
    )
    op.create_index("ix_job_attempts_agent_state", "job_attempts", ["agent_id", "state"])
    op.create_table(
        "job_claims",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("resource", sa.String(160), primary_key=True),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("vram_gb", sa.Float(), nullable=True),
        sa.Column("cpu_cores", sa.Float(), nullable=True),
        sa.Column("memory_gb", sa.Float(), nullable=True),
        sa.Column("used_gb", sa.Float(), nullable=True),
    )
    op.create_index("ix_job_claims_agent", "job_claims", ["agent_id"])
    op.create_table(
        "job_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
    )
    op.create_index("ix_job_events_job_at", "job_events", ["job_id", "at"])


def downgrade() -> None:
    for table in ("job_events", "job_claims", "job_attempts", "jobs"):
        op.drop_table(table)
    with op.batch_alter_table("agent_registry") as batch:
        batch.drop_column("accepts_jobs")
