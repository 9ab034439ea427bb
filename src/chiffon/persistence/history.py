"""Repository functions over the metrics history. Keyword-only, the session passed in."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, delete, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from chiffon.persistence.models import AgentMetricsRow, Base, JsonDocument, UTCDateTime
from chiffon.schemas.metrics import HISTORY, Metric

_metrics = Base.metadata.tables["agent_metrics"]
_registry = Base.metadata.tables["agent_registry"]
_KEY = ("agent_id", "resolution_seconds", "bucket_start")
# The per-GPU numbers a history point keeps (the registry's JSON holds more: name, uuid...).
GPU_FIELDS = ("index", "vram_free_gb", "vram_total_gb", "utilization_percent")


class gpu_points(FunctionElement[Any]):
    """`agent_registry.resource_metrics['gpus']` cut down to `GPU_FIELDS`, as a JSON list.

    Compiled per engine: PostgreSQL walks the JSONB array, SQLite the JSON text.
    """

    type = JsonDocument
    inherit_cache = True


def _pairs(value: str, extract: str) -> str:
    return ", ".join(f"'{name}', {extract.format(value=value, name=name)}" for name in GPU_FIELDS)


@compiles(gpu_points, "postgresql")
def _gpu_points_postgresql(element: gpu_points, compiler: SQLCompiler, **kw: Any) -> str:
    source = compiler.process(element.clauses, **kw)
    fields = _pairs("g", "{value} -> '{name}'")
    return (
        f"COALESCE((SELECT jsonb_agg(jsonb_build_object({fields}) ORDER BY n) "
        f"FROM jsonb_array_elements({source} -> 'gpus') WITH ORDINALITY AS e(g, n)), "
        "'[]'::jsonb)"
    )


@compiles(gpu_points, "sqlite")
def _gpu_points_sqlite(element: gpu_points, compiler: SQLCompiler, **kw: Any) -> str:
    source = compiler.process(element.clauses, **kw)
    fields = _pairs("g.value", "json_extract({value}, '$.{name}')")
    return (
        f"(SELECT json_group_array(json_object({fields})) FROM json_each({source}, '$.gpus') AS g)"
    )


def _source(metric: Metric) -> ColumnElement[Any]:
    """Where a history column's value comes from: the registry's typed column, or (a number
    only history keeps) the registry's JSON, under the metric's declared name."""
    agent = _registry.c
    if metric.registry:
        column: ColumnElement[Any] = agent[metric.name]
        return column
    value = agent.resource_metrics[metric.name]
    number: ColumnElement[Any] = value.as_integer() if metric.kind is int else value.as_float()
    return number


def _online_points(
    *, resolution_seconds: int, bucket_start: datetime, heard_since: datetime
) -> tuple[list[str], Any]:
    """One history row per online agent heard since `heard_since`, from its registry row:
    (the target columns, the SELECT), made from one list of pairs so they cannot drift."""
    agent = _registry.c
    pairs: list[tuple[str, ColumnElement[Any]]] = [
        ("agent_id", agent.agent_id),
        ("resolution_seconds", literal(resolution_seconds, Integer)),
        ("bucket_start", literal(bucket_start, UTCDateTime)),
        ("sampled_at", agent.last_heartbeat_at),
        *((m.name, _source(m)) for m in HISTORY),
        ("gpus", gpu_points(agent.resource_metrics)),
    ]
    # WHERE is also what lets SQLite parse INSERT ... SELECT ... ON CONFLICT unambiguously.
    select_ = select(*(column for _, column in pairs)).where(
        agent.status == "online", agent.last_heartbeat_at >= heard_since
    )
    return [name for name, _ in pairs], select_


async def record_online(
    session: AsyncSession, *, resolution_seconds: int, bucket_start: datetime, heard_since: datetime
) -> int:
    """Copy every online agent's current numbers into one tier's bucket: one statement.

    `INSERT ... SELECT` runs in the database, whatever the fleet's size; a bucket another
    orchestrator already recorded is left as it is (ON CONFLICT DO NOTHING). Returns the
    rows written.
    """
    make = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    target, source = _online_points(
        resolution_seconds=resolution_seconds, bucket_start=bucket_start, heard_since=heard_since
    )
    stmt = (
        make(_metrics)
        .from_select(target, source)
        .on_conflict_do_nothing(index_elements=_KEY)
        # An INSERT's rowcount is otherwise lost when the async cursor closes early.
        .execution_options(preserve_rowcount=True)
    )
    # On the connection, not the ORM session: a Core result, whose rowcount is the database's.
    result = await (await session.connection()).execute(stmt)
    return result.rowcount


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
