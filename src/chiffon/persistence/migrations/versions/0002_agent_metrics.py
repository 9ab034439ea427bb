"""Agent metrics history: every heartbeat for an hour, then 1-minute and 15-minute points.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import JsonDocument, UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_metrics",
        sa.Column("agent_id", sa.Uuid(), primary_key=True),
        sa.Column("resolution_seconds", sa.Integer(), primary_key=True),
        sa.Column("bucket_start", UTCDateTime(), primary_key=True),
        sa.Column("sampled_at", UTCDateTime(), nullable=False),
        sa.Column("cpu_load_1min", sa.Float(), nullable=True),
        sa.Column("cpu_cores_available", sa.Integer(), nullable=True),
        sa.Column("cpu_cores_physical", sa.Integer(), nullable=True),
        sa.Column("memory_available_gb", sa.Float(), nullable=True),
        sa.Column("memory_total_gb", sa.Float(), nullable=True),
        sa.Column("gpu_vram_available_gb", sa.Float(), nullable=True),
        sa.Column("gpu_vram_total_gb", sa.Float(), nullable=True),
        sa.Column("gpus", JsonDocument, nullable=False),
    )
    op.create_index(
        "ix_agent_metrics_resolution_bucket",
        "agent_metrics",
        ["resolution_seconds", "bucket_start"],
    )


def downgrade() -> None:
    op.drop_table("agent_metrics")
