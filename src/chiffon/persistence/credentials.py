"""Repository functions over agent credentials. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chiffon.persistence.db import notices
from chiffon.persistence.models import AgentCredentialRow, Base, EnrollTokenRow

_credentials = Base.metadata.tables["agent_credentials"]
_tokens = Base.metadata.tables["enroll_tokens"]


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


async def mark_suspect(
    session: AsyncSession, *, agent_id: uuid.UUID, reason: str, at: datetime
) -> bool:
    """Quarantine the agent's credential with `reason` (the first reason stays); whether it
    was not suspect before."""
    stmt = (
        update(_credentials)
        .where(_credentials.c.agent_id == agent_id, _credentials.c.suspect_at.is_(None))
        .values(suspect_at=at, suspect_reason=reason[:255])
    )
    return bool(getattr(await session.execute(stmt), "rowcount", 0))


async def set_trust(
    session: AsyncSession, *, agent_id: uuid.UUID, approved_at: datetime | None, clear: bool
) -> bool:
    """Approve the agent (`approved_at`, when it has none yet) and/or clear its suspicion
    (`clear`); whether it holds a credential that is not revoked."""
    values: dict[str, Any] = {}
    if approved_at is not None:
        values["approved_at"] = func.coalesce(_credentials.c.approved_at, approved_at)
    if clear:
        values.update(suspect_at=None, suspect_reason=None)
    stmt = (
        update(_credentials)
        .where(_credentials.c.agent_id == agent_id, _credentials.c.revoked_at.is_(None))
        .values(**values)
    )
    return bool(getattr(await session.execute(stmt), "rowcount", 0))


async def add_enroll_token(session: AsyncSession, *, row: dict[str, Any]) -> None:
    await session.execute(insert(_tokens), [row])


async def list_enroll_tokens(session: AsyncSession) -> list[EnrollTokenRow]:
    stmt = select(EnrollTokenRow).order_by(EnrollTokenRow.created_at)
    return list((await session.scalars(stmt)).all())


async def find_enroll_token(
    session: AsyncSession, *, token_sha256: str, now: datetime
) -> EnrollTokenRow | None:
    """The made token with this digest, if it is unexpired and has uses left."""
    stmt = select(EnrollTokenRow).where(
        EnrollTokenRow.token_sha256 == token_sha256,
        EnrollTokenRow.expires_at.is_(None) | (EnrollTokenRow.expires_at > now),
        EnrollTokenRow.uses_left.is_(None) | (EnrollTokenRow.uses_left > 0),
    )
    return (await session.scalars(stmt)).first()


async def delete_enroll_token(session: AsyncSession, *, token_id: uuid.UUID) -> bool:
    result = await session.execute(delete(_tokens).where(_tokens.c.token_id == token_id))
    return bool(getattr(result, "rowcount", 0))


async def use_enroll_token(
    session: AsyncSession, *, token_sha256: str, now: datetime
) -> Row[Any] | None:
    """Spend one use of the token with this digest, if it is unexpired and has uses left
    (one statement, so two enrollments cannot both spend its last use): its `token_id`,
    `approves` and `uses_left` after, or None. A token whose last use this was is
    deleted."""
    usable = (
        (_tokens.c.token_sha256 == token_sha256)
        & (_tokens.c.expires_at.is_(None) | (_tokens.c.expires_at > now))
        & (_tokens.c.uses_left.is_(None) | (_tokens.c.uses_left > 0))
    )
    stmt = (
        update(_tokens)
        .where(usable)
        .values(uses_left=_tokens.c.uses_left - 1)
        .returning(_tokens.c.token_id, _tokens.c.approves, _tokens.c.uses_left)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return None
    if row.uses_left == 0:
        await session.execute(delete(_tokens).where(_tokens.c.token_id == row.token_id))
    return row


async def drop_expired_tokens(session: AsyncSession, *, now: datetime) -> int:
    result = await session.execute(delete(_tokens).where(_tokens.c.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)


# Migration 0005's trigger notifies this channel with the agent id of every credential
# inserted, updated or deleted, and '*' when the table is truncated (PostgreSQL only).
CHANGES_CHANNEL = "chiffon_credentials"


def credential_changes(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncIterator[str]]:
    """LISTEN for changed credentials: an iterator of agent ids (or '*': all of them),
    which raises when the connection is lost."""
    return notices(engine, CHANGES_CHANNEL)
