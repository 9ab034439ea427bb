"""Repository functions over agent credentials. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chiffon.persistence.db import notices
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


def credential_changes(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncIterator[str]]:
    """LISTEN for changed credentials: an iterator of agent ids (or '*': all of them),
    which raises when the connection is lost."""
    return notices(engine, CHANGES_CHANNEL)
