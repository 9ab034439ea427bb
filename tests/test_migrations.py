"""Migrations build the schema the models describe, and a stale schema is refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, text

from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import db
from chiffon.persistence.db import SchemaBehindError
from chiffon.persistence.models import Base
from tests.conftest import fresh_postgres_database


def _diff(connection: Connection) -> list[object]:
    def include(obj: object, name: str | None, kind: str, *_: object) -> bool:
        # These indexes are PostgreSQL-only (ddl_if), which autogenerate does not know.
        pg_only = name in (
            "ix_agent_registry_online_capacity",
            "idx_agent_registry_resource_metrics",
        )
        return not (pg_only and connection.dialect.name == "sqlite")

    context = MigrationContext.configure(connection, opts={"include_object": include})
    with warnings.catch_warnings():
        # SQLite cannot reflect an index on expressions; it has no such index anyway.
        warnings.filterwarnings("ignore", "autogenerate skipping .* 'ix_agent_registry_online")
        return list(compare_metadata(context, Base.metadata))


def test_migrated_database_matches_the_models(database_url: str) -> None:
    engine = create_engine(db.sync_url(database_url))
    with engine.connect() as connection:
        assert _diff(connection) == []
    engine.dispose()


async def test_orchestrator_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    url = db.default_database_url(tmp_path)
    orchestrator = Orchestrator(OrchestratorSettings(database_url=url))
    with pytest.raises(SchemaBehindError, match="run `chiffon db upgrade`"):
        await orchestrator.start()
    await orchestrator.stop()
    db.upgrade(url)
    orchestrator = Orchestrator(OrchestratorSettings(database_url=url))
    await orchestrator.start(sweep=False)
    await orchestrator.stop()


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = db.default_database_url(tmp_path)
    db.upgrade(url)
    command.downgrade(db.alembic_config(url), "base")
    db.upgrade(url)


def test_downgrade_and_upgrade_again_on_postgresql() -> None:
    def triggers(url: str) -> set[str]:
        engine = create_engine(db.sync_url(url))
        with engine.connect() as connection:
            names = connection.execute(
                text("SELECT tgname FROM pg_trigger WHERE tgrelid = 'agent_credentials'::regclass")
            )
            found = {name for (name,) in names}
        engine.dispose()
        return found

    notify = {"agent_credentials_notify", "agent_credentials_notify_truncate"}
    with fresh_postgres_database() as url:
        assert triggers(url) == notify
        command.downgrade(db.alembic_config(url), "0004")
        assert triggers(url) == set()
        command.downgrade(db.alembic_config(url), "base")
        db.upgrade(url)
        assert triggers(url) == notify
