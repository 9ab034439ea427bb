"""Queue changes announced (PostgreSQL): NOTIFY chiffon_queue, '<table>'.

A statement that queues jobs (an insert into `jobs`) or releases an attempt's claims (a
delete from `job_claims`: the attempt ended, was lost or handed back) notifies the
channel once, whoever made it. Every orchestrator that places LISTENs and wakes its
dispatcher: a job submitted to an orchestrator that does not place (`--no-dispatch`), or
room made by an agent reporting to another orchestrator, is placed at once rather than
at the next tick (orchestrator.service.Orchestrator._follow_queue). Statement-level
triggers: a pass that queues or frees many costs one notice, and PostgreSQL folds equal
notices of one transaction into one. SQLite has no LISTEN; its one orchestrator wakes
its own dispatcher.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# The channel is named in chiffon.persistence.jobs.QUEUE_CHANNEL too.
UPGRADE = [
    """
    CREATE FUNCTION chiffon_queue_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM changed) THEN
            PERFORM pg_notify('chiffon_queue', TG_TABLE_NAME);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER jobs_notify_queued
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION chiffon_queue_changed()
    """,
    """
    CREATE TRIGGER job_claims_notify_released
    AFTER DELETE ON job_claims REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION chiffon_queue_changed()
    """,
]
DOWNGRADE = [
    "DROP TRIGGER job_claims_notify_released ON job_claims",
    "DROP TRIGGER jobs_notify_queued ON jobs",
    "DROP FUNCTION chiffon_queue_changed()",
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
