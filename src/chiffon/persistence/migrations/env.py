"""Alembic environment: the URL comes from `chiffon.persistence.db.alembic_config`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from chiffon.persistence.models import Base

config = context.config


def run_migrations() -> None:
    engine = create_engine(config.attributes["url"], poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
