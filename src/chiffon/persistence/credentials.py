"""Repository functions over agent credentials. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import Row, bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

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
).where(_credentials.c.agent_id.in_(bindparam("agent_ids", expanding=True)))


async def get_credentials(
    session: AsyncSession, *, agent_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, Row[Any]]:
    """The credentials of these agents (`agent_id`, `nonce`, `secret_sha256`, `key_id`), in
    one query; agents without one are left out."""
    result = await session.execute(_LOOKUP, {"agent_ids": list(agent_ids)})
    return {row.agent_id: row for row in result}


async def add_credential(session: AsyncSession, *, row: dict[str, Any]) -> None:
    """Insert one; an agent that already has a credential raises `IntegrityError`."""
    await session.execute(insert(_credentials), [row])


async def delete_credential(session: AsyncSession, *, agent_id: uuid.UUID) -> bool:
    """Remove an agent's credential; whether it had one."""
    stmt = delete(_credentials).where(_credentials.c.agent_id == agent_id)
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))
