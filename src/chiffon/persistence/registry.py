"""Repository functions over the registry. Keyword-only, the session passed in explicitly."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic_core import to_json
from sqlalchemy import (
    Integer,
    Row,
    Select,
    TextClause,
    Uuid,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import BindParameter

from chiffon.persistence.models import AgentEventRow, AgentRow, Base, JobClaimRow
from chiffon.schemas.metrics import BOUNDS, REGISTRY

_agents = Base.metadata.tables["agent_registry"]
_events = Base.metadata.tables["agent_events"]


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One change of an agent's status, as `agent_events` keeps it: the one shape every
    writer (ingest, the offline sweep, deregistration) uses."""

    agent_id: uuid.UUID
    at: datetime
    from_status: str | None
    to_status: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ordering:
    """Where an agent's message stream stood when last applied."""

    status: str
    boot_id: uuid.UUID | None
    seq: int | None
    sent_at: datetime | None
    prev_boot_id: uuid.UUID | None = None  # the run before `boot_id`'s


@dataclass(frozen=True, slots=True)
class CapacityFilter:
    """A capacity requirement. `bounds` maps a metric bound's parameter
    (`schemas.metrics.Bound.param`, e.g. `min_gpu_vram_gb`) to the value asked; a bound not
    given, or given as None, is no requirement on that number."""

    bounds: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    pool_name: str | None = None
    agent_type: str | None = "desktop"
    limit: int | None = None
    labels: tuple[tuple[str, str], ...] = ()  # every one must match (key = value)


# Ingest's read of the rows a batch changes, built once. PostgreSQL gets the ids as one
# uuid[] parameter (`= ANY`): the same SQL text for every batch, which the drivers convert
# once, where an expanding IN is 500 placeholders rewritten per batch (item 20 in
# docs/performance.md). SQLite has no arrays: an expanding IN.
_ORDERING_COLUMNS = (
    _agents.c.agent_id,
    _agents.c.status,
    _agents.c.last_boot_id,
    _agents.c.last_seq,
    _agents.c.last_sent_at,
    _agents.c.prev_boot_id,
)
_LOCK_ORDERINGS_ANY = (
    select(*_ORDERING_COLUMNS)
    .where(_agents.c.agent_id == any_(bindparam("agent_ids", type_=postgresql.ARRAY(Uuid))))
    .order_by(_agents.c.agent_id)
    .with_for_update()
)
_LOCK_ORDERINGS_IN = (
    select(*_ORDERING_COLUMNS)
    .where(_agents.c.agent_id.in_(bindparam("agent_ids", expanding=True)))
    .order_by(_agents.c.agent_id)
    .with_for_update()
)


async def lock_orderings(
    session: AsyncSession, *, agent_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Ordering]:
    """Read and lock (on PostgreSQL) the rows a batch is about to change.

    Rows are locked in id order so two orchestrators applying overlapping batches
    cannot deadlock.
    """
    postgres = session.get_bind().dialect.name == "postgresql"
    stmt = _LOCK_ORDERINGS_ANY if postgres else _LOCK_ORDERINGS_IN
    rows = await session.execute(stmt, {"agent_ids": sorted(agent_ids)})
    return {row[0]: Ordering(*row[1:]) for row in rows}


# `hold` is the credential's (`sync_holds`), never a heartbeat's to overwrite.
_UPSERT_KEEP = frozenset({"agent_id", "created_at", "hold", "hold_reason"})


@functools.cache  # built once, not for every ingest batch
def _sqlite_upsert() -> Any:
    stmt = sqlite.insert(_agents)
    changed = {c.name: stmt.excluded[c.name] for c in _agents.columns if c.name not in _UPSERT_KEEP}
    return stmt.on_conflict_do_update(index_elements=[_agents.c.agent_id], set_=changed)


@functools.cache
def _upsert_from_json(dialect: Dialect) -> TextClause:
    """PostgreSQL: the whole batch as one JSON parameter, unpacked by the server.

    An executemany of 500 rows costs the orchestrator SQLAlchemy's and psycopg's work per
    row and parameter (binding, type processing, one Bind/Execute each); one document
    through `jsonb_to_recordset` costs one encoding (docs/performance.md, item 17).
    """
    columns = list(_agents.columns)
    names = ", ".join(c.name for c in columns)
    shapes = ", ".join(f"{c.name} {c.type.compile(dialect=dialect)}" for c in columns)
    changed = ", ".join(
        f"{c.name} = excluded.{c.name}" for c in columns if c.name not in _UPSERT_KEEP
    )
    return text(
        f"INSERT INTO {_agents.name} ({names}) SELECT {names} "
        f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r({shapes}) "
        f"ON CONFLICT (agent_id) DO UPDATE SET {changed}"
    )


async def upsert_agents(session: AsyncSession, *, rows: Sequence[dict[str, Any]]) -> None:
    """Insert new agents and overwrite known ones, in one statement."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        ordered = sorted(rows, key=lambda row: row["agent_id"])  # lock order, as above
        # pydantic's Rust encoder: a quarter of json.dumps' time for these rows (UUIDs
        # and the batcher's aware datetimes, ISO 8601 with their offset, as PostgreSQL reads)
        document = to_json(ordered).decode()
        await session.execute(_upsert_from_json(dialect), {"rows": document})
    else:
        await session.execute(_sqlite_upsert(), list(rows))


async def mark_offline(session: AsyncSession, *, rows: Sequence[dict[str, Any]]) -> None:
    """Apply goodbyes: `rows` carry agent_id, updated_at and the message ordering."""
    if not rows:
        return
    stmt = (
        update(_agents)
        .where(_agents.c.agent_id == bindparam("b_agent_id"))
        .values(
            status="offline",
            updated_at=bindparam("b_updated_at"),
            last_boot_id=bindparam("b_boot_id"),
            last_seq=bindparam("b_seq"),
            last_sent_at=bindparam("b_sent_at"),
            prev_boot_id=bindparam("b_prev_boot_id"),
        )
    )
    # Bind names must differ from column names in an executemany UPDATE.
    await session.execute(stmt, [{f"b_{k}": v for k, v in row.items()} for row in rows])


async def sync_holds(
    session: AsyncSession, *, agent_ids: Sequence[uuid.UUID], now: datetime
) -> None:
    """Copy the agents' credential state into the registry rows placement reads: 'suspect'
    (with its reason) before 'pending' (not yet approved); an agent without a credential
    (one run in the orchestrator's own process) holds nothing. A row it changes is stamped
    `now`, so the scheduler's cache reads it again."""
    if not agent_ids:
        return
    cred = Base.metadata.tables["agent_credentials"]
    mine = cred.c.agent_id == _agents.c.agent_id
    suspect = select(cred.c.suspect_reason).where(mine, cred.c.suspect_at.is_not(None))
    pending = select(cred.c.agent_id).where(mine, cred.c.approved_at.is_(None))
    hold = case((exists(suspect), "suspect"), (exists(pending), "pending"), else_=None)
    reason = case(
        (exists(suspect), suspect.scalar_subquery()),
        (exists(pending), "waiting for an admin to approve it (chiffon agents approve)"),
        else_=None,
    )
    stmt = (
        update(_agents)
        .where(_agents.c.agent_id.in_(list(agent_ids)))
        .values(hold=hold, hold_reason=reason, updated_at=now)
    )
    await session.execute(stmt)


async def add_events(session: AsyncSession, *, events: Sequence[StatusEvent]) -> None:
    if events:
        await session.execute(insert(_events), [dataclasses.asdict(e) for e in events])


async def mark_silent_offline(
    session: AsyncSession, *, cutoff: datetime, now: datetime
) -> list[uuid.UUID]:
    """Mark online agents not heard from since `cutoff` offline; one statement.

    Safe with several orchestrators: PostgreSQL re-checks `status = 'online'` after
    waiting for a row lock, so each agent is marked (and returned) by exactly one.
    """
    stmt = (
        update(_agents)
        .where(_agents.c.status == "online", _agents.c.last_heartbeat_at < cutoff)
        .values(status="offline", updated_at=now)
        .returning(_agents.c.agent_id)
    )
    return list((await session.execute(stmt)).scalars())


async def count_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(AgentRow.status, func.count()).group_by(AgentRow.status))
    return {str(row[0]): int(row[1]) for row in rows}


async def get_agent(session: AsyncSession, *, agent_id: uuid.UUID) -> AgentRow | None:
    return await session.get(AgentRow, agent_id)


async def list_agents(
    session: AsyncSession,
    *,
    status: str | None = None,
    agent_type: str | None = None,
    pool_name: str | None = None,
    labels: Sequence[tuple[str, str]] = (),
) -> Sequence[AgentRow]:
    stmt = select(AgentRow).order_by(AgentRow.pool_name, AgentRow.name, AgentRow.agent_id)
    stmt = with_labels(stmt, labels)
    if status is not None:
        stmt = stmt.where(AgentRow.status == status)
    if agent_type is not None:
        stmt = stmt.where(AgentRow.agent_type == agent_type)
    if pool_name is not None:
        stmt = stmt.where(AgentRow.pool_name == pool_name)
    return (await session.scalars(stmt)).all()


# What a capacity answer shows, read as plain rows: a read-only list needs no ORM objects,
# nor the labels and capabilities it does not show (docs/performance.md, optimisation 8).
CAPACITY_COLUMNS = (
    AgentRow.agent_id,
    AgentRow.name,
    AgentRow.pool_name,
    AgentRow.agent_type,
    AgentRow.status,
    *(_agents.c[m.name] for m in REGISTRY),
    AgentRow.resource_metrics,
    AgentRow.last_heartbeat_at,
    # Whether live jobs hold claims there: its free numbers are then netted
    # (orchestrator.capacity). An index lookup per row; no claim, no other query.
    exists(select(JobClaimRow.agent_id).where(JobClaimRow.agent_id == AgentRow.agent_id)).label(
        "claimed"
    ),
)
_BOUNDS = {bound.param: (_agents.c[m.name], bound.op) for m, bound in BOUNDS}


def capacity_statement(want: CapacityFilter) -> tuple[Select[Any], dict[str, Any]]:
    """Online agents meeting every requirement, most free VRAM first: (statement, values).

    A requirement on a number excludes agents for which that number is unknown (NULL);
    an agent that never reported metrics (`last_heartbeat_at` unset) never matches.
    The statement depends only on which requirements are given, so it is built once per
    combination and the values are bound at execution.
    """
    unknown = set(want.bounds) - set(_BOUNDS)
    if unknown:
        raise ValueError(f"no capacity bound named {', '.join(sorted(unknown))}")
    given = {name: value for name, value in want.bounds.items() if value is not None}
    given |= {
        name: value
        for name in ("pool_name", "agent_type", "limit")
        if (value := getattr(want, name)) is not None
    }
    return with_labels(_capacity_shape(frozenset(given)), want.labels), given


def with_labels(stmt: Select[Any], labels: Sequence[tuple[str, str]]) -> Select[Any]:
    """Only agents carrying every `key=value` label (a JSON lookup on either engine)."""
    for key, value in labels:
        stmt = stmt.where(AgentRow.labels[key].as_string() == value)
    return stmt


@functools.cache
def _capacity_shape(given: frozenset[str]) -> Select[Any]:
    stmt = select(*CAPACITY_COLUMNS).where(
        AgentRow.status == "online", AgentRow.cpu_cores_physical.is_not(None)
    )
    for name, (column, op) in _BOUNDS.items():
        if name in given:
            value: BindParameter[Any] = bindparam(name)
            stmt = stmt.where(column >= value if op == "min" else column <= value)
    if "pool_name" in given:
        stmt = stmt.where(AgentRow.pool_name == bindparam("pool_name"))
    if "agent_type" in given:
        stmt = stmt.where(AgentRow.agent_type == bindparam("agent_type"))
    stmt = stmt.order_by(
        AgentRow.gpu_vram_available_gb.desc().nulls_last(),
        AgentRow.cpu_cores_available.desc().nulls_last(),
        AgentRow.memory_available_gb.desc().nulls_last(),
        AgentRow.agent_id,
    )
    if "limit" in given:
        stmt = stmt.limit(bindparam("limit", type_=Integer))
    return stmt


async def find_capacity(session: AsyncSession, *, want: CapacityFilter) -> Sequence[Row[Any]]:
    """Rows of `CAPACITY_COLUMNS`, named as `AgentRow`'s attributes."""
    stmt, values = capacity_statement(want)
    rows: Sequence[Row[Any]] = (await session.execute(stmt, values)).all()
    return rows


async def delete_agent(session: AsyncSession, *, agent_id: uuid.UUID) -> str | None:
    """Remove an agent; returns the status it had, or None when it was not registered."""
    stmt = delete(_agents).where(_agents.c.agent_id == agent_id).returning(_agents.c.status)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_events(
    session: AsyncSession, *, agent_id: uuid.UUID | None = None, limit: int = 100
) -> Sequence[AgentEventRow]:
    stmt = select(AgentEventRow).order_by(AgentEventRow.at.desc(), AgentEventRow.id.desc())
    if agent_id is not None:
        stmt = stmt.where(AgentEventRow.agent_id == agent_id)
    return (await session.scalars(stmt.limit(limit))).all()


@dataclass(frozen=True, slots=True)
class PoolTotals:
    """One pool's agents of one status, summed by the database."""

    pool_name: str
    status: str
    agents: int
    cpu_cores_physical: int
    cpu_cores_available: int
    gpu_count: int
    gpu_vram_total_gb: float
    gpu_vram_available_gb: float


async def pool_totals(session: AsyncSession) -> list[PoolTotals]:
    """Counts and capacity sums per (pool, status): one GROUP BY, no agent loaded."""
    stmt = (
        select(
            AgentRow.pool_name,
            AgentRow.status,
            func.count(),
            func.coalesce(func.sum(AgentRow.cpu_cores_physical), 0),
            func.coalesce(func.sum(AgentRow.cpu_cores_available), 0),
            func.coalesce(func.sum(AgentRow.gpu_count), 0),
            func.coalesce(func.sum(AgentRow.gpu_vram_total_gb), 0.0),
            func.coalesce(func.sum(AgentRow.gpu_vram_available_gb), 0.0),
        )
        .group_by(AgentRow.pool_name, AgentRow.status)
        .order_by(AgentRow.pool_name, AgentRow.status)
    )
    return [_pool_totals(tuple(row)) for row in await session.execute(stmt)]


def _pool_totals(row: Sequence[Any]) -> PoolTotals:
    pool, status, agents, cores, cores_free, gpus, vram, vram_free = row
    return PoolTotals(
        pool_name=str(pool),
        status=str(status),
        agents=int(agents),
        cpu_cores_physical=int(cores),
        cpu_cores_available=int(cores_free),
        gpu_count=int(gpus),
        gpu_vram_total_gb=float(vram),
        gpu_vram_available_gb=float(vram_free),
    )
