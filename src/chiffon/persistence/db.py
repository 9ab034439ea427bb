"""Engines, sessions and schema migrations for SQLite and PostgreSQL, one code path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic_core import to_json
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

_MIGRATIONS = "chiffon.persistence:migrations"


class SchemaBehindError(RuntimeError):
    """The database has not been migrated to the schema this code needs."""


def default_database_url(data_dir: Path) -> str:
    """The embedded registry: one SQLite file in the user's data directory."""
    return f"sqlite:///{data_dir / 'chiffon.db'}"


def async_url(url: str) -> URL:
    """The async driver for a URL a user wrote (`sqlite:///`, `postgresql://`, ...)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


def sync_url(url: str) -> URL:
    """The blocking twin of `async_url`, for Alembic."""
    parsed = async_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite")
    return parsed  # psycopg 3 serves both


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while ingest writes; busy_timeout waits out a writer.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _json_text(value: Any) -> str:
    """JSON columns through pydantic's Rust encoder, which also takes pydantic models
    (ingest hands it a heartbeat's resources as they were validated)."""
    return to_json(value).decode()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`; SQLite files get WAL and a busy timeout."""
    target = async_url(url)
    kwargs.setdefault("json_serializer", _json_text)
    if target.get_backend_name() == "sqlite":
        if target.database and target.database != ":memory:":
            _private_file(Path(target.database).expanduser())
        engine = create_async_engine(target, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    # Most recently used first: after a burst has grown the pool, ingest's one transaction
    # at a time stays on one connection. FIFO spread it over the whole pool, and ingest
    # ran a third slower after 2,000 concurrent enrollments (docs/performance.md).
    kwargs.setdefault("pool_use_lifo", True)
    return create_async_engine(target, **kwargs)


def _private_file(path: Path) -> None:
    """The SQLite registry holds agent credentials' hashes and the fleet's layout: its
    directory is created 0700 and the file is 0600 (SQLite gives its -wal and -shm files
    the database file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _MIGRATIONS)
    cfg.attributes["url"] = sync_url(url)
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (what `chiffon db upgrade` runs)."""
    if async_url(url).get_backend_name() == "sqlite":
        create_engine(url).sync_engine.dispose()  # creates the data directory
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def check_schema(engine: AsyncEngine) -> None:
    """Raise `SchemaBehindError` with the command to run unless the schema is current."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
    head = head_revision()
    if current != head:
        raise SchemaBehindError(
            f"database schema is at {current or 'nothing'}, this Chiffon needs {head}: "
            "run `chiffon db upgrade` (with the same --database-url) first"
        )


# TCP keepalives on a listening connection: a peer that vanished without closing the
# connection is noticed within about a minute instead of never.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


@asynccontextmanager
async def notices(engine: AsyncEngine, channel: str) -> AsyncIterator[AsyncIterator[str]]:
    """LISTEN to `channel` on a connection of its own (outside the pool), PostgreSQL only:
    yields an iterator of the notices' payloads, which raises when the connection is
    lost."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conninfo = psycopg.conninfo.make_conninfo(url, **_KEEPALIVES)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(f"LISTEN {channel}")
        yield (notice.payload async for notice in conn.notifies())
