"""Repository functions over the metrics history. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.persistence.models import AgentMetricsRow, Base

_metrics = Base.metadata.tables["agent_metrics"]
_KEY = ("agent_id", "resolution_seconds", "bucket_start")


def _insert_statement(dialect: str) -> Any:
    """The first point written to a bucket stays; later ones are dropped by the database."""
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return make(_metrics).on_conflict_do_nothing(index_elements=list(_KEY))


async def add_points(session: AsyncSession, *, rows: Sequence[dict[str, Any]]) -> None:
    """Write a batch's history points, every tier, in one statement."""
    if rows:
        await session.execute(_insert_statement(session.get_bind().dialect.name), list(rows))


async def prune_tier(session: AsyncSession, *, resolution_seconds: int, before: datetime) -> int:
    """Delete one tier's buckets that start before `before`; returns how many."""
    stmt = delete(_metrics).where(
        _metrics.c.resolution_seconds == resolution_seconds,
        _metrics.c.bucket_start < before,
    )
    result = await session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


async def list_points(
    session: AsyncSession,
    *,
    agent_id: uuid.UUID,
    resolution_seconds: int,
    since: datetime,
    until: datetime,
) -> Sequence[AgentMetricsRow]:
    """One tier's points of one agent in [since, until], oldest first."""
    stmt = (
        select(AgentMetricsRow)
        .where(
            AgentMetricsRow.agent_id == agent_id,
            AgentMetricsRow.resolution_seconds == resolution_seconds,
            AgentMetricsRow.bucket_start >= since,
            AgentMetricsRow.bucket_start <= until,
        )
        .order_by(AgentMetricsRow.bucket_start)
    )
    return (await session.scalars(stmt)).all()
