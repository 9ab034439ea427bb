"""Repository functions over jobs, attempts and claims. Keyword-only, the session passed in.

The one writer of job, attempt, claim and event rows: a job's state changes only in
`move` and `_assignment`, both along the contract's table (`schemas.dispatch.check_move`,
with who moves it). `orchestrator.jobs` and the scheduler decide; they write through here.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    Select,
    Update,
    Uuid,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from chiffon.persistence.db import notices
from chiffon.persistence.models import (
    AgentEventRow,
    AgentRow,
    JobAttemptRow,
    JobClaimRow,
    JobEventRow,
    JobIdempotencyKeyRow,
    JobLogRow,
    JobRow,
)
from chiffon.schemas.dispatch import AttemptState, Mover, check_move, gpu_resource

HOST = "host"
REASON_MAX_CHARS = 1000  # jobs.reason, job_events.reason, job_attempts.reason
# Rows a whole-table read takes at a time: at 10,000 agents one read in one go held the
# event loop (and the API and ingest beside it) for about half a second.
STREAM_ROWS = 500


def _postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def add_job(
    session: AsyncSession,
    *,
    job_id: uuid.UUID,
    name: str | None,
    spec: dict[str, Any],
    now: datetime,
) -> JobRow:
    job = JobRow(
        job_id=job_id, name=name, state="queued", reason="", spec=spec, attempt=0,
        retries_used=0, submitted_at=now, updated_at=now,
    )  # fmt: skip
    session.add(job)
    session.add(JobEventRow(job_id=job_id, at=now, attempt=0, from_state=None,
                            to_state="queued", reason="submitted"))  # fmt: skip
    return job


async def add_idempotency_key(
    session: AsyncSession, *, key: str, job_id: uuid.UUID, request_sha256: str, now: datetime
) -> None:
    """Remember that `key` created `job_id`. Its primary key refuses a second row for the
    key at commit (IntegrityError), even from a transaction running beside this one."""
    session.add(JobIdempotencyKeyRow(
        key=key, job_id=job_id, request_sha256=request_sha256, created_at=now
    ))  # fmt: skip


async def idempotency_key(
    session: AsyncSession, *, key: str, since: datetime
) -> JobIdempotencyKeyRow | None:
    """The row of `key` if it was given at or after `since` (an older one is forgotten,
    whether or not it was pruned yet)."""
    stmt = select(JobIdempotencyKeyRow).where(
        JobIdempotencyKeyRow.key == key, JobIdempotencyKeyRow.created_at >= since
    )
    return (await session.scalars(stmt)).one_or_none()


async def forget_idempotency_keys(
    session: AsyncSession, *, before: datetime, key: str | None = None
) -> int:
    """Delete the keys given before `before` (only `key`, when given); how many."""
    stmt = delete(JobIdempotencyKeyRow).where(JobIdempotencyKeyRow.created_at < before)
    if key is not None:
        stmt = stmt.where(JobIdempotencyKeyRow.key == key)
    result = await session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


# A queued job's shape: what placement reads of its spec, as the database writes it out
# (its requirements as JSON text, its policy, its timeout; "" where absent). Jobs of one
# shape fit, or miss, alike; the scheduler groups the queue by it (`queued_shapes`).
Shape = tuple[str, str, str]
_SHAPE_KEYS = ("requirements", "policy", "timeout_seconds")


def _shape_columns() -> list[ColumnElement[str]]:
    # PostgreSQL writes jsonb out in one canonical form, SQLite JSON as stored: either way
    # the same expression gives the same text for the same spec, and one shape may show as
    # several (labels in another order), never two shapes as one.
    return [func.coalesce(JobRow.spec[key].as_string(), "") for key in _SHAPE_KEYS]


def _taken_back_since(since: datetime) -> Select[Any]:
    """The jobs a desktop's owner took back since `since` (`taken_back`)."""
    return select(JobAttemptRow.job_id).where(
        JobAttemptRow.state == "preempted", JobAttemptRow.ended_at >= since
    )


@dataclass(frozen=True, slots=True)
class QueuedShape:
    """Queued jobs of one shape and one reason (`queued_shapes`)."""

    shape: Shape
    reason: str
    avoided: bool  # taken back lately (`taken_back`): each has its own desktops to avoid
    jobs: int
    oldest: datetime  # the oldest one's submission


@dataclass(frozen=True, slots=True)
class Queued:
    job_id: uuid.UUID
    submitted_at: datetime
    spec: dict[str, Any]


async def queued_shapes(session: AsyncSession, *, avoided_since: datetime) -> list[QueuedShape]:
    """The queue grouped by shape, reason and whether a desktop's owner took the job back
    since `avoided_since`, in one statement: the database groups, so 20,000 jobs of one
    shape with one reason come back as one row."""
    shape = _shape_columns()
    taken = _taken_back_since(avoided_since).distinct().subquery()
    avoided = taken.c.job_id.is_not(None)
    counts = (func.count().label("jobs"), func.min(JobRow.submitted_at).label("oldest"))
    stmt = (
        select(*shape, JobRow.reason, avoided.label("avoided"), *counts)
        .select_from(JobRow)
        .outerjoin(taken, taken.c.job_id == JobRow.job_id)
        .where(JobRow.state == "queued")
        .group_by(*shape, JobRow.reason, avoided)
    )
    return [
        QueuedShape((r[0], r[1], r[2]), r.reason, bool(r.avoided), int(r.jobs), r.oldest)
        for r in (await session.execute(stmt)).all()
    ]


async def queued(
    session: AsyncSession,
    *,
    after: tuple[datetime, uuid.UUID],
    limit: int,
    skip: Sequence[Shape] = (),
    avoided_since: datetime | None = None,
) -> list[Queued]:
    """The next queued jobs after `after` (submitted_at, job_id) in submission order,
    nothing locked; none of a shape in `skip` but those taken back since `avoided_since`
    (their own desktops to avoid make them a shape of their own)."""
    at, job_id = after
    stmt = (
        select(JobRow.job_id, JobRow.submitted_at, JobRow.spec)
        .where(
            JobRow.state == "queued",
            JobRow.submitted_at >= at,  # the index's range; the line below is the cursor
            or_(JobRow.submitted_at > at, JobRow.job_id > job_id),
        )
        .order_by(JobRow.submitted_at, JobRow.job_id)
        .limit(limit)
    )
    if skip:
        kept: ColumnElement[bool] = tuple_(*_shape_columns()).not_in(skip)
        if avoided_since is not None:
            kept = or_(kept, JobRow.job_id.in_(_taken_back_since(avoided_since)))
        stmt = stmt.where(kept)
    return [Queued(r.job_id, r.submitted_at, r.spec) for r in (await session.execute(stmt)).all()]


async def say_why(
    session: AsyncSession,
    *,
    shape: Shape,
    was: str,
    reason: str,
    now: datetime,
    avoided_since: datetime,
) -> int:
    """Give the queued jobs of `shape` whose reason is `was` the reason they wait now, in
    one statement, but not those taken back since `avoided_since` (each its own). On
    PostgreSQL a job another transaction holds is skipped, not waited for: it is being
    placed. How many were written."""
    reason = reason[:REASON_MAX_CHARS]
    which = select(JobRow.job_id).where(
        JobRow.state == "queued",
        JobRow.reason == was,
        *(column == value for column, value in zip(_shape_columns(), shape, strict=True)),
        JobRow.job_id.not_in(_taken_back_since(avoided_since)),
    )
    if _postgres(session):
        which = which.with_for_update(skip_locked=True)
    stmt = (
        update(JobRow)
        .where(JobRow.job_id.in_(which))
        .values(reason=reason, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


async def take_queued(session: AsyncSession, *, job_id: uuid.UUID) -> JobRow | None:
    """The job, locked until commit, if it is still queued; None when it is not, or when
    another orchestrator holds it now (PostgreSQL's SKIP LOCKED: it is placing it)."""
    stmt = select(JobRow).where(JobRow.job_id == job_id, JobRow.state == "queued")
    if _postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    return (await session.scalars(stmt)).one_or_none()


async def take_queued_many(session: AsyncSession, *, job_ids: Sequence[uuid.UUID]) -> list[JobRow]:
    """`take_queued` for several jobs in one statement, in the order of `job_ids`: those
    still queued and not held by another orchestrator, each locked until commit."""
    stmt = select(JobRow).where(JobRow.job_id.in_(job_ids), JobRow.state == "queued")
    if _postgres(session):
        stmt = stmt.with_for_update(skip_locked=True)
    found = {job.job_id: job for job in (await session.scalars(stmt)).all()}
    return [found[j] for j in job_ids if j in found]


_CANDIDATE_COLUMNS = (
    AgentRow.agent_id,
    AgentRow.name,
    AgentRow.status,
    AgentRow.accepts_jobs,
    AgentRow.hold,
    AgentRow.pool_name,
    AgentRow.labels,
    AgentRow.cpu_cores_available,
    AgentRow.cpu_cores_physical,
    AgentRow.memory_available_gb,
    AgentRow.resource_metrics,
)


async def agent_rows(
    session: AsyncSession, *, agent_ids: Sequence[uuid.UUID] | None = None
) -> Sequence[Row[Any]]:
    """Every agent as placement needs it (offline ones too: the reason counts them), or
    those of `agent_ids`."""
    if agent_ids is None:  # the whole registry: read in parts, the event loop free between
        result = await session.stream(select(*_CANDIDATE_COLUMNS))
        return [row async for part in result.partitions(STREAM_ROWS) for row in part]
    found: list[Row[Any]] = []
    for chunk in _chunks(agent_ids, STREAM_ROWS):
        stmt = select(*_CANDIDATE_COLUMNS).where(AgentRow.agent_id.in_(chunk))
        found += (await session.execute(stmt)).all()
    return found


# Placement's lock on an agent (PostgreSQL): a transaction-level advisory lock on
# (PLACEMENT_LOCK_CLASS, the first 32 bits of the agent's id), not its registry row's
# lock. Ingest writes that row at every heartbeat: under a row lock, each heartbeat of an
# agent being placed on waited for the placement's commit (and for a scheduler the CPU
# or its garbage collector had put aside), and each placement skipped the agents whose
# heartbeats were being written. Two agents sharing 32 bits only share a lock: one is
# skipped for a moment.
PLACEMENT_LOCK_CLASS = 0x43484650
_TRY_PLACEMENT_LOCKS = text(
    "SELECT a FROM unnest(:ids, :keys) AS t(a, k) WHERE pg_try_advisory_xact_lock(:class, k)"
).bindparams(
    bindparam("ids", type_=postgresql.ARRAY(Uuid)),
    bindparam("keys", type_=postgresql.ARRAY(Integer)),
)


def _placement_lock_key(agent_id: uuid.UUID) -> int:
    return int.from_bytes(agent_id.bytes[:4], "big", signed=True)


async def lock_agents(session: AsyncSession, *, agent_ids: Sequence[uuid.UUID]) -> list[Row[Any]]:
    """The agents as placement needs them, each one's placement lock held until commit
    (PostgreSQL): whoever claims on an agent holds it, so two placements on one agent are
    decided one after the other, each reading the claims the other committed. Agents
    whose lock another transaction holds now (another orchestrator placing there) are
    left out, never waited for, so that two orchestrators cannot deadlock or queue up;
    ingest never takes it. SQLite has one writer at a time anyway."""
    if _postgres(session) and agent_ids:
        ids = sorted(agent_ids)
        keys = [_placement_lock_key(a) for a in ids]
        params = {"ids": ids, "keys": keys, "class": PLACEMENT_LOCK_CLASS}
        agent_ids = list((await session.scalars(_TRY_PLACEMENT_LOCKS, params)).all())
        if not agent_ids:
            return []
    stmt = select(*_CANDIDATE_COLUMNS).where(AgentRow.agent_id.in_(agent_ids))
    return list((await session.execute(stmt)).all())


async def registered(session: AsyncSession, *, agent_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `agent_ids` still in the registry."""
    stmt = select(AgentRow.agent_id).where(AgentRow.agent_id.in_(agent_ids))
    return set((await session.scalars(stmt)).all())


async def agents_placed_on(session: AsyncSession, *, since: datetime) -> set[uuid.UUID]:
    """The agents on which an attempt was placed at or after `since`."""
    stmt = select(JobAttemptRow.agent_id).where(JobAttemptRow.assigned_at >= since).distinct()
    return set((await session.scalars(stmt)).all())


async def agents_changed(session: AsyncSession, *, since: datetime) -> dict[uuid.UUID, datetime]:
    """The agents whose registry row changed (a heartbeat, a status) or on which an
    attempt was placed or ended at or after `since`: all that moves what placement sees.
    Each with the time of its latest such change."""
    rows = select(AgentRow.agent_id, AgentRow.updated_at.label("at")).where(
        AgentRow.updated_at >= since
    )
    placed = select(JobAttemptRow.agent_id, JobAttemptRow.assigned_at).where(
        JobAttemptRow.assigned_at >= since
    )
    ended = select(JobAttemptRow.agent_id, JobAttemptRow.ended_at).where(
        JobAttemptRow.ended_at >= since
    )
    changes = union_all(rows, placed, ended).subquery()
    latest = select(changes.c.agent_id, func.max(changes.c.at)).group_by(changes.c.agent_id)
    found: dict[uuid.UUID, datetime] = {}
    for row in (await session.execute(latest)).all():
        if row[0] is not None:
            found[row[0]] = row[1]
    return found


RELIABILITY_WINDOW = timedelta(days=7)


async def setbacks(
    session: AsyncSession, *, now: datetime, agent_ids: Sequence[uuid.UUID] | None = None
) -> dict[uuid.UUID, tuple[int, int]]:
    """Each agent's reliability record over `RELIABILITY_WINDOW`: (times it went offline,
    attempts its owner took back). Agents with neither are absent."""
    since = now - RELIABILITY_WINDOW
    offline = select(AgentEventRow.agent_id, func.count()).where(
        AgentEventRow.to_status == "offline", AgentEventRow.at >= since
    )
    taken = select(JobAttemptRow.agent_id, func.count()).where(
        JobAttemptRow.state == "preempted", JobAttemptRow.ended_at >= since
    )
    if agent_ids is not None:
        offline = offline.where(AgentEventRow.agent_id.in_(agent_ids))
        taken = taken.where(JobAttemptRow.agent_id.in_(agent_ids))
    found: dict[uuid.UUID, tuple[int, int]] = {}
    for agent_id, n in (await session.execute(offline.group_by(AgentEventRow.agent_id))).all():
        found[agent_id] = (n, 0)
    for agent_id, n in (await session.execute(taken.group_by(JobAttemptRow.agent_id))).all():
        found[agent_id] = (found.get(agent_id, (0, 0))[0], n)
    return found


async def taken_back(
    session: AsyncSession, *, job_ids: Sequence[uuid.UUID], since: datetime
) -> dict[uuid.UUID, set[uuid.UUID]]:
    """The agents whose owner took each job back since `since`."""
    stmt = select(JobAttemptRow.job_id, JobAttemptRow.agent_id).where(
        JobAttemptRow.job_id.in_(job_ids),
        JobAttemptRow.state == "preempted",
        JobAttemptRow.ended_at >= since,
    )
    found: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for job_id, agent_id in (await session.execute(stmt)).all():
        found[job_id].add(agent_id)
    return dict(found)


async def claims_by_agent(
    session: AsyncSession, *, agent_ids: Sequence[uuid.UUID] | None = None
) -> dict[uuid.UUID, list[JobClaimRow]]:
    found: dict[uuid.UUID, list[JobClaimRow]] = defaultdict(list)
    if agent_ids is None:  # every live claim: read in parts, the event loop free between
        result = await session.stream_scalars(select(JobClaimRow))
        async for part in result.partitions(STREAM_ROWS):
            for claim in part:
                found[claim.agent_id].append(claim)
        return dict(found)
    for chunk in _chunks(agent_ids):
        stmt = select(JobClaimRow).where(JobClaimRow.agent_id.in_(chunk))
        for claim in (await session.scalars(stmt)).all():
            found[claim.agent_id].append(claim)
    return dict(found)


def _chunks(ids: Sequence[uuid.UUID], size: int = 1000) -> list[Sequence[uuid.UUID]]:
    """`IN` lists of at most `size` (SQLite caps the parameters of one statement)."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def move(
    job: JobRow, to_state: str, *, by: Mover | None = None, reason: str, now: datetime
) -> JobEventRow:
    """Change a job's state along the table (by `by`); the event to add beside it. The
    reason is cut to what its columns hold (an agent's words, a long path in them)."""
    check_move(job.state, to_state, by)
    reason = reason[:REASON_MAX_CHARS]
    event = JobEventRow(job_id=job.job_id, at=now, attempt=job.attempt, from_state=job.state,
                        to_state=to_state, reason=reason)  # fmt: skip
    job.state, job.reason, job.updated_at = to_state, reason, now
    return event


def request_cancel(job: JobRow, *, now: datetime) -> None:
    """Mark a job with an attempt out as to be cancelled: its agent is told, and ends it."""
    job.cancel_requested_at = job.updated_at = now


async def cancel_queued(session: AsyncSession, *, job: JobRow, now: datetime) -> None:
    """Cancel a job that waits to be placed: it ends at once."""
    session.add(move(job, "cancelled", by="user", reason="cancelled while queued", now=now))
    job.ended_at = now
    await announce_log(session, job_id=job.job_id)  # its followers are done


async def start_attempt(
    session: AsyncSession, *, job: JobRow, log_path: str | None, now: datetime
) -> None:
    """The job's current attempt started (its agent said so)."""
    session.add(move(job, "running", by="agent", reason="started", now=now))
    await session.execute(
        _attempt(job.job_id, job.attempt).values(state="running", started_at=now, log_path=log_path)
    )


async def record_use(
    session: AsyncSession, *, job_id: uuid.UUID, attempt: int, vram_gb: Mapping[str, float]
) -> None:
    """What an attempt's processes hold on each GPU it claims (its claims' `used_gb`)."""
    claims = await session.scalars(
        select(JobClaimRow).where(JobClaimRow.job_id == job_id, JobClaimRow.attempt == attempt)
    )
    for claim in claims:
        if claim.resource != HOST:
            claim.used_gb = vram_gb.get(claim.resource.removeprefix("gpu:"), 0.0)


async def end_attempt(
    session: AsyncSession, *, job: JobRow, to_state: str, attempt_state: AttemptState,
    by: Mover, reason: str, exit_code: int | None, signal: int | None,
    peak_vram_gb: Mapping[str, float] | None, spent_retry: bool, preempted: bool,
    now: datetime,
) -> None:  # fmt: skip
    """End the job's current attempt as decided, release its claims, and move the job:
    to `to_state`, or back to the queue (then no agent holds it)."""
    attempt = job.attempt
    job.preemptions += int(preempted)
    job.retries_used += int(spent_retry)
    session.add(move(job, to_state, by=by, reason=reason, now=now))
    await session.execute(
        _attempt(job.job_id, attempt).values(
            state=attempt_state, ended_at=now, exit_code=exit_code, signal=signal,
            reason=reason[:REASON_MAX_CHARS],
            peak_vram_gb=dict(peak_vram_gb) if peak_vram_gb else None,
        )
    )  # fmt: skip
    await session.execute(
        delete(JobClaimRow).where(JobClaimRow.job_id == job.job_id, JobClaimRow.attempt == attempt)
    )
    if to_state == "queued":
        job.agent_id = None
    else:
        job.ended_at, job.exit_code = now, exit_code
    await announce_log(session, job_id=job.job_id)  # the attempt's followers are done


async def late_end_attempt(
    session: AsyncSession, *, job: JobRow, agent_id: uuid.UUID, to_state: str,
    retries_used: int, reason: str, attempt_reason: str, exit_code: int | None,
    signal: int | None, now: datetime,
) -> None:  # fmt: skip
    """End a job whose attempt was judged lost as its agent later said it ended."""
    job.retries_used = retries_used
    session.add(move(job, to_state, by="agent", reason=reason, now=now))
    await session.execute(
        _attempt(job.job_id, job.attempt).values(
            state=to_state, exit_code=exit_code, signal=signal,
            reason=attempt_reason[:REASON_MAX_CHARS],
        )
    )  # fmt: skip
    job.agent_id, job.ended_at, job.exit_code = agent_id, now, exit_code
    await announce_log(session, job_id=job.job_id)


def _attempt(job_id: uuid.UUID, attempt: int) -> Update:
    return update(JobAttemptRow).where(
        JobAttemptRow.job_id == job_id, JobAttemptRow.attempt == attempt
    )


@dataclass(frozen=True, slots=True)
class Held:
    """A claim as placement reads it (a `JobClaimRow`'s fields), without the ORM."""

    resource: str
    agent_id: uuid.UUID
    vram_gb: float | None = None
    cpu_cores: float | None = None
    memory_gb: float | None = None
    used_gb: float | None = None


Claimed = JobClaimRow | Held  # a claim read from the database, or about to be written


@dataclass(frozen=True, slots=True)
class Placing:
    """One job's next attempt, to be written by `assign_many`."""

    job: JobRow
    agent_id: uuid.UUID
    gpus: Sequence[tuple[str, float]]  # (GPU id, GB claimed)
    cpu_cores: float
    memory_gb: float
    agent_name: str | None = None


def assign(
    session: AsyncSession,
    *,
    job: JobRow,
    agent_id: uuid.UUID,
    agent_name: str | None = None,
    gpus: Sequence[tuple[str, float]],
    cpu_cores: float,
    memory_gb: float,
    now: datetime,
) -> list[Held]:
    """Place `job` on `agent_id` as its next attempt, claiming `gpus` ((id, GB) each),
    cores and memory there: written in the caller's transaction, after `lock_agents`.
    Returns the claims written. One job through the ORM; the scheduler writes its
    batches with `assign_many`."""
    placing = Placing(job, agent_id, gpus, cpu_cores, memory_gb, agent_name)
    event, attempt, claims = _assignment(placing, now)
    session.add(JobEventRow(**event))
    session.add(JobAttemptRow(**attempt))
    session.add_all(JobClaimRow(**_claim_columns(c)) for c in claims)
    return claims


async def assign_many(
    session: AsyncSession, placings: Sequence[Placing], *, now: datetime
) -> list[list[Held]]:
    """`assign` for a batch: the events, attempts and claims written as three bulk
    INSERTs (the jobs' own rows are updated by the ORM at the flush). The claims written,
    per placing."""
    rows = [_assignment(p, now) for p in placings]
    if rows:
        await session.execute(insert(JobEventRow), [event for event, _, _ in rows])
        await session.execute(insert(JobAttemptRow), [attempt for _, attempt, _ in rows])
        claims = [_claim_columns(c) for _, _, held in rows for c in held]
        await session.execute(insert(JobClaimRow), claims)
    return [held for _, _, held in rows]


def _assignment(p: Placing, now: datetime) -> tuple[dict[str, Any], dict[str, Any], list[Held]]:
    """Move the job to `assigned` as its next attempt; its event's, attempt's and claims'
    rows."""
    job = p.job
    job.attempt += 1
    job.agent_id = p.agent_id
    where = f"{p.agent_name} ({p.agent_id})" if p.agent_name else str(p.agent_id)
    gpu_ids = f", GPUs {', '.join(gpu for gpu, _ in p.gpus)}" if p.gpus else ""
    reason = f"placed on {where}{gpu_ids}"
    check_move(job.state, "assigned", "scheduler")
    event = {"job_id": job.job_id, "at": now, "attempt": job.attempt, "from_state": job.state,
             "to_state": "assigned", "reason": reason}  # fmt: skip
    job.state, job.reason, job.updated_at = "assigned", reason, now
    attempt = {"job_id": job.job_id, "attempt": job.attempt, "agent_id": p.agent_id,
               "state": "assigned", "gpu_uuids": [gpu for gpu, _ in p.gpus],
               "assigned_at": now, "reason": ""}  # fmt: skip
    claims = claim_rows(job_id=job.job_id, attempt=job.attempt, agent_id=p.agent_id,
                        gpus=p.gpus, cpu_cores=p.cpu_cores, memory_gb=p.memory_gb)  # fmt: skip
    return event, attempt, claims


def claim_rows(
    *,
    job_id: uuid.UUID,
    attempt: int,
    agent_id: uuid.UUID,
    gpus: Sequence[tuple[str, float]],
    cpu_cores: float,
    memory_gb: float,
) -> list[Held]:
    """The claims an attempt holds (written by `assign` and `assign_many`), each tagged
    with its job and attempt for the writing."""
    return [
        _Claim(HOST, agent_id, cpu_cores=cpu_cores, memory_gb=memory_gb, job_id=job_id,
               attempt=attempt),
        *(_Claim(gpu_resource(gpu), agent_id, vram_gb=gb, job_id=job_id, attempt=attempt)
          for gpu, gb in gpus),
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Claim(Held):
    job_id: uuid.UUID | None = None
    attempt: int = 0


def _claim_columns(c: Held) -> dict[str, Any]:
    assert isinstance(c, _Claim)
    return {"job_id": c.job_id, "attempt": c.attempt, "resource": c.resource,
            "agent_id": c.agent_id, "vram_gb": c.vram_gb, "cpu_cores": c.cpu_cores,
            "memory_gb": c.memory_gb}  # fmt: skip


async def list_jobs(
    session: AsyncSession,
    *,
    state: str | None = None,
    agent_id: uuid.UUID | None = None,
    limit: int = 100,
) -> Sequence[JobRow]:
    """Jobs, newest first."""
    stmt = select(JobRow).order_by(JobRow.submitted_at.desc(), JobRow.job_id).limit(limit)
    if state is not None:
        stmt = stmt.where(JobRow.state == state)
    if agent_id is not None:
        stmt = stmt.where(JobRow.agent_id == agent_id)
    return (await session.scalars(stmt)).all()


async def history(
    session: AsyncSession, *, job_id: uuid.UUID
) -> tuple[Sequence[JobAttemptRow], Sequence[JobEventRow]]:
    """A job's attempts (in order) and its events (oldest first)."""
    attempts = await session.scalars(
        select(JobAttemptRow).where(JobAttemptRow.job_id == job_id).order_by(JobAttemptRow.attempt)
    )
    events = await session.scalars(
        select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
    )
    return attempts.all(), events.all()


async def log_end(session: AsyncSession, *, job_id: uuid.UUID, attempt: int) -> int:
    """How many bytes of the attempt's log the orchestrator has heard of."""
    stmt = select(func.max(JobLogRow.offset + func.length(JobLogRow.data))).where(
        JobLogRow.job_id == job_id, JobLogRow.attempt == attempt
    )
    return int((await session.scalar(stmt)) or 0)


async def append_log(
    session: AsyncSession,
    *,
    job_id: uuid.UUID,
    attempt: int,
    offset: int,
    data: bytes,
    tail_bytes: int,
) -> int:
    """Keep the chunk at `offset` (the part not already kept: a resent chunk is harmless),
    then drop chunks wholly before the last `tail_bytes`. The log's end after it."""
    end = await log_end(session, job_id=job_id, attempt=attempt)
    if offset < end:  # sent again after an answer was lost
        data, offset = data[end - offset :], end
    if data:
        session.add(JobLogRow(job_id=job_id, attempt=attempt, offset=offset, data=data))
        end = offset + len(data)
        await session.flush()
    await session.execute(
        delete(JobLogRow).where(
            JobLogRow.job_id == job_id,
            JobLogRow.attempt == attempt,
            JobLogRow.offset + func.length(JobLogRow.data) <= end - tail_bytes,
        )
    )
    return end


async def read_log(
    session: AsyncSession, *, job_id: uuid.UUID, attempt: int, offset: int, limit: int
) -> tuple[int, bytes]:
    """Up to `limit` bytes of the attempt's log from `offset`, or from the oldest byte
    still kept when those before it were dropped: (where the bytes start, the bytes)."""
    stmt = (
        select(JobLogRow.offset, JobLogRow.data)
        .where(
            JobLogRow.job_id == job_id,
            JobLogRow.attempt == attempt,
            JobLogRow.offset + func.length(JobLogRow.data) > offset,
        )
        .order_by(JobLogRow.offset)
    )
    start: int | None = None
    out = bytearray()
    for at, data in (await session.execute(stmt)).all():
        if start is None:
            start = max(offset, at)
        elif at != start + len(out):  # a gap (a chunk never arrived): stop before it
            break
        out += data[max(0, start + len(out) - at) :]
        if len(out) >= limit:
            break
    if start is None:
        return offset, b""
    return start, bytes(out[:limit])


async def prune_logs(session: AsyncSession, *, ended_before: datetime) -> int:
    """Drop the logs of jobs that ended before `ended_before`; how many chunks."""
    ended = select(JobRow.job_id).where(JobRow.ended_at < ended_before)
    result = await session.execute(delete(JobLogRow).where(JobLogRow.job_id.in_(ended)))
    return int(getattr(result, "rowcount", 0) or 0)


async def agent_names(
    session: AsyncSession, *, agent_ids: Sequence[uuid.UUID | None]
) -> dict[uuid.UUID, str]:
    """The names of those agents still registered."""
    wanted = {a for a in agent_ids if a is not None}
    if not wanted:
        return {}
    stmt = select(AgentRow.agent_id, AgentRow.name).where(AgentRow.agent_id.in_(wanted))
    return {agent_id: name for agent_id, name in (await session.execute(stmt)).all()}


@dataclass(frozen=True, slots=True)
class Current:
    """What a job's view shows of its current attempt."""

    gpu_uuids: list[str]
    started_at: datetime | None


async def current_attempts(
    session: AsyncSession, *, jobs: Sequence[JobRow]
) -> dict[uuid.UUID, Current]:
    """Each job's current attempt (jobs with an attempt out, or that ended on one): the
    GPUs it holds, and when it started running."""
    out = [j for j in jobs if j.agent_id is not None and j.attempt > 0]
    current = {j.job_id: j.attempt for j in out}
    found: dict[uuid.UUID, Current] = {}
    for chunk in _chunks(list(current)):
        stmt = select(
            JobAttemptRow.job_id,
            JobAttemptRow.attempt,
            JobAttemptRow.gpu_uuids,
            JobAttemptRow.started_at,
        ).where(JobAttemptRow.job_id.in_(chunk))
        for job_id, attempt, gpus, started_at in (await session.execute(stmt)).all():
            if current.get(job_id) == attempt:
                found[job_id] = Current(list(gpus), started_at)
    return found


async def log_bytes_cut(session: AsyncSession, *, job_id: uuid.UUID) -> dict[int, int]:
    """For each attempt of the job with output kept, how many bytes at the start of its
    log are not kept (the offset of its oldest kept chunk: the orchestrator keeps a tail,
    and an agent may skip output far behind). Attempts absent: nothing kept."""
    stmt = (
        select(JobLogRow.attempt, func.min(JobLogRow.offset))
        .where(JobLogRow.job_id == job_id)
        .group_by(JobLogRow.attempt)
    )
    return {attempt: int(first) for attempt, first in (await session.execute(stmt)).all()}


# Migration 0012's triggers notify this channel (PostgreSQL only) when jobs are queued
# and when an attempt's claims are released (it ended, or was lost): a dispatcher
# anywhere may now place something.
QUEUE_CHANNEL = "chiffon_queue"


def queue_changes(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncIterator[str]]:
    """LISTEN for queue changes: an iterator of notices (the table that changed), which
    raises when the connection is lost."""
    return notices(engine, QUEUE_CHANNEL)


# The job-log channel (PostgreSQL only): its payload is a job id, notified in the
# transaction that stores a chunk of the job's output or ends its attempt (or cancels it
# while queued), so that every orchestrator's log followers of that job wake once it is
# committed, and ask the database nothing until then. No trigger: the code that changes
# what a follower would read says so.
LOG_CHANNEL = "chiffon_job_logs"


async def announce_log(session: AsyncSession, *, job_id: uuid.UUID) -> None:
    """Notify `LOG_CHANNEL` of `job_id` at this transaction's commit (nothing on SQLite,
    whose one orchestrator wakes its own followers)."""
    if _postgres(session):
        await session.execute(select(func.pg_notify(LOG_CHANNEL, str(job_id))))


# Migration 0016's trigger notifies this channel with an agent's id when a job is placed
# on it or a cancel is asked of a job out there (PostgreSQL only).
ORDERS_CHANNEL = "chiffon_orders"


def order_changes(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncIterator[str]]:
    """LISTEN for agents with new orders: an iterator of agent ids, which raises when the
    connection is lost."""
    return notices(engine, ORDERS_CHANNEL)


def log_changes(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncIterator[str]]:
    """LISTEN for job-log changes: an iterator of job ids, which raises when the
    connection is lost."""
    return notices(engine, LOG_CHANNEL)
