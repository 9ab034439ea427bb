"""What changed in the fleet since a moment: the scheduler keeps its picture of the fleet
between passes and reads again only the agents whose registry row changed, or on which
an attempt was placed or ended, since its last pass (orchestrator.scheduler.FleetCache).
The attempts' times are indexed; the registry's `updated_at` is not: every heartbeat
writes it, and an index on it would cost ingest PostgreSQL's in-place (HOT) updates,
where reading 10,000 rows' times takes a few milliseconds a pass.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_job_attempts_assigned", "job_attempts", ["assigned_at"])
    op.create_index("ix_job_attempts_ended", "job_attempts", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_job_attempts_ended", "job_attempts")
    op.drop_index("ix_job_attempts_assigned", "job_attempts")
