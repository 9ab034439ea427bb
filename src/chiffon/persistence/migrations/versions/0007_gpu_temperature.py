"""The hottest GPU's temperature as a typed column, so capacity can filter on it.

`gpu_temperature_max_c` (schemas.metrics) is derived at ingest from the GPUs' own
`temperature_c`. Rows written before this migration hold NULL (unknown) until the agent's
next heartbeat, which fills it: a `max_gpu_temperature_c` requirement skips them until then.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agent_registry") as batch:
        batch.add_column(sa.Column("gpu_temperature_max_c", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_registry") as batch:
        batch.drop_column("gpu_temperature_max_c")
