"""Orders announced (PostgreSQL): NOTIFY chiffon_orders, '<agent_id>'.

A job row that is placed on an agent (its state becomes `assigned`) or whose cancel is
asked while it is out there notifies the channel with that agent's id, whoever wrote it.
Every orchestrator LISTENs and wakes that agent's order long-poll, which otherwise asks
the database nothing while it waits (orchestrator.service.Orchestrator.wait_orders): one
query a second for every agent polling over HTTP before. SQLite has no LISTEN: there an
agent's poll is woken by its own orchestrator and asks again every second for the others.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# The channel is named in chiffon.persistence.jobs.ORDERS_CHANNEL too.
UPGRADE = [
    """
    CREATE FUNCTION chiffon_orders_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('chiffon_orders', NEW.agent_id::text);
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER jobs_notify_orders
    AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (NEW.agent_id IS NOT NULL AND (
        (NEW.state = 'assigned' AND OLD.state IS DISTINCT FROM 'assigned')
        OR NEW.cancel_requested_at IS DISTINCT FROM OLD.cancel_requested_at))
    EXECUTE FUNCTION chiffon_orders_changed()
    """,
]
DOWNGRADE = [
    "DROP TRIGGER jobs_notify_orders ON jobs",
    "DROP FUNCTION chiffon_orders_changed()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in DOWNGRADE:
        op.execute(statement)
