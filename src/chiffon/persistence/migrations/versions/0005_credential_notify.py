"""Credential changes announced (PostgreSQL): NOTIFY chiffon_credentials, '<agent_id>'.

Every insert, update or delete of a row in `agent_credentials` notifies the channel with
the agent's id, and a TRUNCATE with '*', whoever made the change: an orchestrator, or an
administrator in psql. Orchestrators LISTEN and drop that agent's cached credential, so a
revocation is refused everywhere at once, and a verified credential can stay cached far
longer than the heartbeat interval (docs/security.md, docs/performance.md). SQLite has no
LISTEN; there the cache expires after `CHIFFON_CREDENTIAL_CACHE_SECONDS`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

# The channel is named in chiffon.persistence.credentials.CHANGES_CHANNEL too.
UPGRADE = [
    """
    CREATE FUNCTION chiffon_credential_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('chiffon_credentials', '*');
        ELSIF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('chiffon_credentials', OLD.agent_id::text);
        ELSE
            PERFORM pg_notify('chiffon_credentials', NEW.agent_id::text);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER agent_credentials_notify
    AFTER INSERT OR UPDATE OR DELETE ON agent_credentials
    FOR EACH ROW EXECUTE FUNCTION chiffon_credential_changed()
    """,
    """
    CREATE TRIGGER agent_credentials_notify_truncate
    AFTER TRUNCATE ON agent_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION chiffon_credential_changed()
    """,
]
DOWNGRADE = [
    "DROP TRIGGER agent_credentials_notify_truncate ON agent_credentials",
    "DROP TRIGGER agent_credentials_notify ON agent_credentials",
    "DROP FUNCTION chiffon_credential_changed()",
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
