"""Repository functions over agent credentials. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import Row, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chiffon.persistence.models import AgentCredentialRow, Base

_credentials = Base.metadata.tables["agent_credentials"]


async def get_credential(
    session: AsyncSession, *, agent_id: uuid.UUID
) -> AgentCredentialRow | None:
    return await session.get(AgentCredentialRow, agent_id)


# Ingest's lookup, built once: plain rows, the ids bound as an expanding IN at execution.
_LOOKUP = select(
    _credentials.c.agent_id,
    _credentials.c.nonce,
    _credentials.c.secret_sha256,
    _credentials.c.key_id,
    _credentials.c.revoked_at,
).where(_credentials.c.agent_id.in_(bindparam("agent_ids", expanding=True)))


async def get_credentials(
    session: AsyncSession, *, agent_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, Row[Any]]:
    """The credentials of these agents (`agent_id`, `nonce`, `secret_sha256`, `key_id`,
    `revoked_at`), in one query; agents without one are left out."""
    result = await session.execute(_LOOKUP, {"agent_ids": list(agent_ids)})
    return {row.agent_id: row for row in result}


async def add_credential(session: AsyncSession, *, row: dict[str, Any]) -> None:
    """Insert one; an agent that already has a credential raises `IntegrityError`."""
    await session.execute(insert(_credentials), [row])


async def revoke_credential(session: AsyncSession, *, agent_id: uuid.UUID, at: datetime) -> bool:
    """Ban the agent's credential (the row stays, `revoked_at` set); whether one was active."""
    stmt = (
        update(_credentials)
        .where(_credentials.c.agent_id == agent_id, _credentials.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    return bool(getattr(await session.execute(stmt), "rowcount", 0))


async def delete_credential(
    session: AsyncSession, *, agent_id: uuid.UUID, banned_only: bool = False
) -> bool:
    """Remove an agent's credential row (with `banned_only`: only a ban, which lifts it);
    whether there was one."""
    stmt = delete(_credentials).where(_credentials.c.agent_id == agent_id)
    if banned_only:
        stmt = stmt.where(_credentials.c.revoked_at.is_not(None))
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))


# Migration 0005's trigger notifies this channel with the agent id of every credential
# inserted, updated or deleted, and '*' when the table is truncated (PostgreSQL only).
CHANGES_CHANNEL = "chiffon_credentials"
# TCP keepalives on the listening connection: a peer that vanished without closing the
# connection is noticed within about a minute instead of never.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


@asynccontextmanager
async def credential_changes(engine: AsyncEngine) -> AsyncIterator[AsyncIterator[str]]:
    """LISTEN on a connection of its own (outside the pool) for changed credentials:
    yields an iterator of agent ids (or '*': all of them), which raises when the
    connection is lost."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conninfo = psycopg.conninfo.make_conninfo(url, **_KEEPALIVES)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        yield (notice.payload async for notice in conn.notifies())
