"""Agent registry and status events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import BigId, JsonDocument, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_registry",
        sa.Column("agent_id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("agent_type", sa.String(64), nullable=False),
        sa.Column("pool_name", sa.String(128), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("labels", JsonDocument, nullable=False),
        sa.Column("capabilities", JsonDocument, nullable=False),
        sa.Column("specializations", JsonDocument, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_heartbeat_at", UTCDateTime(), nullable=True),
        sa.Column("resource_metrics", JsonDocument, nullable=False, server_default="{}"),
        sa.Column("cpu_cores_available", sa.Integer(), nullable=True),
        sa.Column("cpu_cores_physical", sa.Integer(), nullable=True),
        sa.Column("cpu_load_1min", sa.Float(), nullable=True),
        sa.Column("memory_available_gb", sa.Float(), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_type", sa.String(16), nullable=False),
        sa.Column("gpu_vram_total_gb", sa.Float(), nullable=True),
        sa.Column("gpu_vram_available_gb", sa.Float(), nullable=True),
        sa.Column("gpu_vram_available_max_gb", sa.Float(), nullable=True),
        sa.Column("last_boot_id", sa.Uuid(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_sent_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        postgresql_with={"fillfactor": 70},
    )
    op.create_index("ix_agent_registry_status_type", "agent_registry", ["status", "agent_type"])
    op.create_index("ix_agent_registry_pool", "agent_registry", ["pool_name"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "idx_agent_registry_resource_metrics",
            "agent_registry",
            ["resource_metrics"],
            postgresql_using="gin",
        )
    op.create_table(
        "agent_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
    )
    op.create_index("ix_agent_events_agent_at", "agent_events", ["agent_id", "at"])


def downgrade() -> None:
    op.drop_table("agent_events")
    op.drop_table("agent_registry")
