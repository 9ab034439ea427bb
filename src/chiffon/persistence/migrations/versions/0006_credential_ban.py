"""A revoked credential stays as a ban.

Revocation used to delete the row, and the agent enrolled again at once with the
enrollment token under its old id. Now the row is kept with `revoked_at` set: the id is
refused, and cannot enroll, until an operator lifts the ban (`chiffon agents unban`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_credentials") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_credentials") as batch:
        batch.drop_column("revoked_at")
