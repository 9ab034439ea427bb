"""Who may take work: agents approved by an admin, agents whose secret seems stolen, and
enrollment tokens with a number of uses or an expiry.

- `agent_credentials.approved_at`: NULL until an admin approves the agent (`chiffon agents
  approve`); credentials issued before this revision count as approved when issued.
- `agent_credentials.suspect_at`, `suspect_reason`: its secret seemed to be used from two
  places; no new jobs until an admin clears it.
- `agent_registry.hold`, `hold_reason`: placement's copy of the two ('pending', 'suspect').
- `agent_registry.prev_boot_id`: the run before the last, to notice two runs alternating.
- `enroll_tokens`: tokens made by `chiffon tokens create` (only their SHA-256).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import UTCDateTime

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_credentials") as table:
        table.add_column(sa.Column("approved_at", UTCDateTime(), nullable=True))
        table.add_column(sa.Column("suspect_at", UTCDateTime(), nullable=True))
        table.add_column(sa.Column("suspect_reason", sa.String(255), nullable=True))
    op.execute("UPDATE agent_credentials SET approved_at = created_at")
    with op.batch_alter_table("agent_registry") as table:
        table.add_column(sa.Column("hold", sa.String(16), nullable=True))
        table.add_column(sa.Column("hold_reason", sa.String(255), nullable=True))
        table.add_column(sa.Column("prev_boot_id", sa.Uuid(), nullable=True))
    op.create_table(
        "enroll_tokens",
        sa.Column("token_id", sa.Uuid(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("approves", sa.Boolean(), nullable=False),
        sa.Column("note", sa.String(255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_id"),
        sa.UniqueConstraint("token_sha256"),
    )


def downgrade() -> None:
    op.drop_table("enroll_tokens")
    with op.batch_alter_table("agent_registry") as table:
        table.drop_column("prev_boot_id")
        table.drop_column("hold_reason")
        table.drop_column("hold")
    with op.batch_alter_table("agent_credentials") as table:
        table.drop_column("suspect_reason")
        table.drop_column("suspect_at")
        table.drop_column("approved_at")
