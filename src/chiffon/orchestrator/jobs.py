"""A job's life on the orchestrator: submit, cancel, the agent's reports and output, a lost
desktop (docs/jobs.md says the same for people).

This module decides, by the contract's tables (`schemas.dispatch`: the moves, who makes
them, what an outcome does); `persistence.jobs` is the one writer of job, attempt, claim
and event rows, and every state change there goes through `check_move`. An attempt's
claims are released in the transaction that ends it. What changes what a
log follower reads (a chunk, an attempt's end, a cancel while queued) is announced in its
transaction too (`persistence.jobs.announce_log`).

Fencing: a report names its attempt. One that is not the job's current attempt on that
agent, or that comes after the job ended, changes nothing and is answered `stale`, so
the agent ends what it still runs of it (a desktop back from a partition never runs a job
that was placed again elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.jobspec import JobSpec
from chiffon.orchestrator.store import latest_checkpoint
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import AgentRow, JobAttemptRow, JobRow
from chiffon.schemas.dispatch import (
    LATE_ENDS,
    OUT,
    Mover,
    Outcome,
    Report,
    Verdict,
    attempt_ended,
    is_out,
    is_terminal,
    next_state,
    spends_retry,
)
from chiffon.schemas.jobs import JobLog, JobSubmit
from chiffon.transport.orders import Order

log = logging.getLogger(__name__)


# How long a submission's `Idempotency-Key` is remembered: a client retrying a lost reply
# does so within seconds; a day covers a laptop that slept through it.
IDEMPOTENCY_KEY_SECONDS = 24 * 3600


class KeyReusedError(Exception):
    """An idempotency key given again with another submission than the one it created
    `job_id` for."""

    def __init__(self, key: str, job_id: uuid.UUID) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was given in the last day with another submission "
            f"(job {job_id}); use a new key for a new job"
        )
        self.key, self.job_id = key, job_id


async def submit(
    sessions: async_sessionmaker[AsyncSession],
    spec: JobSubmit,
    *,
    now: datetime,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """Queue a job; its id. With an `idempotency_key` given within the last
    `IDEMPOTENCY_KEY_SECONDS`, the job that key created, and nothing is created (a client
    whose reply was lost sends its submission again with the same key): `KeyReusedError`
    when that key came with another submission."""
    document = spec.model_dump(mode="json")
    if idempotency_key is None:
        return await _create(sessions, document, now=now)
    digest = _digest(document)
    since = now - timedelta(seconds=IDEMPOTENCY_KEY_SECONDS)
    if (first := await _keyed_job(sessions, idempotency_key, digest, since)) is not None:
        return first
    try:
        return await _create(sessions, document, now=now, key=(idempotency_key, digest, since))
    except IntegrityError:  # a submission with the key committed first, beside this one
        if (first := await _keyed_job(sessions, idempotency_key, digest, since)) is None:
            raise
        return first


async def _create(
    sessions: async_sessionmaker[AsyncSession],
    document: dict[str, Any],
    *,
    now: datetime,
    key: tuple[str, str, datetime] | None = None,
) -> uuid.UUID:
    """A new queued job, and with `key` (the key, the submission's digest, the oldest
    time a key is remembered from) the key's row, in the same transaction."""
    job_id = uuid.uuid4()
    async with sessions.begin() as session:
        if key is not None:
            idempotency_key, digest, since = key
            # Expired but not pruned yet: forgotten, so the key may be used afresh.
            await repo.forget_idempotency_keys(session, before=since, key=idempotency_key)
            await repo.add_idempotency_key(
                session, key=idempotency_key, job_id=job_id, request_sha256=digest, now=now
            )
        await repo.add_job(
            session, job_id=job_id, name=document.get("name"), spec=document, now=now
        )
    return job_id


async def _keyed_job(
    sessions: async_sessionmaker[AsyncSession], key: str, digest: str, since: datetime
) -> uuid.UUID | None:
    """The job `key` created since `since`; None when it created none."""
    async with sessions() as session:
        row = await repo.idempotency_key(session, key=key, since=since)
    if row is None:
        return None
    if row.request_sha256 != digest:
        raise KeyReusedError(key, row.job_id)
    log.info("idempotency key %r given again: job %s, nothing created", key, row.job_id)
    return row.job_id


def _digest(document: dict[str, Any]) -> str:
    """SHA-256 of the submission as validated, in canonical JSON: two bodies that say the
    same (keys in another order, a default written out) have the same digest."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def forget_idempotency_keys(
    sessions: async_sessionmaker[AsyncSession], *, now: datetime
) -> int:
    """Delete the idempotency keys older than `IDEMPOTENCY_KEY_SECONDS`; how many."""
    before = now - timedelta(seconds=IDEMPOTENCY_KEY_SECONDS)
    async with sessions.begin() as session:
        return await repo.forget_idempotency_keys(session, before=before)


async def cancel(
    sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, *, now: datetime
) -> str | None:
    """Cancel: a queued job at once; one with an attempt out is marked, and ends when its
    agent says so (or when the agent is lost). Idempotent. The job's state, None if none."""
    async with sessions.begin() as session:
        job = await _locked(session, job_id)
        if job is None:
            return None
        if job.state == "queued":
            await repo.cancel_queued(session, job=job, now=now)
        elif not is_terminal(job.state) and job.cancel_requested_at is None:
            repo.request_cancel(job, now=now)
        return job.state


async def report(
    sessions: async_sessionmaker[AsyncSession],
    *,
    agent_id: uuid.UUID,
    job_id: uuid.UUID,
    attempt: int,
    said: Report,
    now: datetime,
) -> Verdict:
    async with sessions.begin() as session:
        job = await _locked(session, job_id)
        if job is None:
            return "unknown_job"
        current = job.attempt == attempt and job.agent_id == agent_id
        if current and is_out(job.state):
            await _heard(session, job, said, now)
            return "applied"
        if said.kind == "ended" and await _late_end(session, job, agent_id, attempt, said, now):
            return "applied"
        return "stale"


async def _heard(session: AsyncSession, job: JobRow, said: Report, now: datetime) -> None:
    """What the agent said of the job's current attempt, out on it."""
    if said.kind == "started":
        if job.state == "assigned":
            await _start(session, job, now, log_path=said.log_path)
    elif said.kind == "usage":
        await _record_use(session, job, said.vram_gb or {})
    elif said.kind == "ended":
        if job.state == "assigned" and not said.never_ran():  # ended before its start was
            await _start(session, job, now)  # heard: it did start
        await _end(session, job, said, now)
    # "alive": only whether it is still current, which the verdict says


async def ship_log(
    sessions: async_sessionmaker[AsyncSession],
    *,
    agent_id: uuid.UUID,
    job_id: uuid.UUID,
    attempt: int,
    offset: int,
    data: bytes,
    tail_bytes: int,
) -> Verdict:
    """A chunk of an attempt's output, kept when the attempt is the job's current one on
    that agent (fenced like a report; an agent ships the rest before it reports the end)."""
    async with sessions.begin() as session:
        job = await session.get(JobRow, job_id)
        if job is None:
            return "unknown_job"
        if job.attempt != attempt or job.agent_id != agent_id:
            return "stale"
        if not is_out(job.state):
            return "stale"
        await repo.append_log(session, job_id=job_id, attempt=attempt, offset=offset,
                              data=data, tail_bytes=tail_bytes)  # fmt: skip
        await repo.announce_log(session, job_id=job_id)
        return "applied"


async def log_piece(
    session: AsyncSession, *, job_id: uuid.UUID, attempt: int | None, offset: int, limit: int
) -> JobLog | None:
    """Up to `limit` bytes of an attempt's output from `offset` (its current attempt by
    default), never ending inside a character while more may follow. None: no such job
    (an attempt it never had reads as empty and done)."""
    job = await session.get(JobRow, job_id, populate_existing=True)
    if job is None:
        return None
    n = job.attempt if attempt is None else attempt
    # Over: the job ended, or this is not its live attempt (one handed back when the job
    # was queued again, a later one, or one it never had).
    live = n == job.attempt and (is_out(job.state) or n == 0)
    over = is_terminal(job.state) or not live
    start, data = await repo.read_log(session, job_id=job_id, attempt=n, offset=offset, limit=limit)
    end = await repo.log_end(session, job_id=job_id, attempt=n)
    done = over and start + len(data) >= end
    if not done:
        data = data[: utf8_complete(data)]
    return JobLog(job_id=job_id, attempt=n, offset=start, next_offset=start + len(data),
                  data=data.decode(errors="replace"), done=done,
                  skipped_bytes=max(0, start - offset))  # fmt: skip


def utf8_complete(data: bytes) -> int:
    """The length of `data` without a UTF-8 character cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            need = 2 if byte >= 0xC0 else 1
            need = 3 if byte >= 0xE0 else need
            need = 4 if byte >= 0xF0 else need
            return len(data) - back if need > back else len(data)
    return len(data)


async def pending_orders(
    sessions: async_sessionmaker[AsyncSession], *, agent_id: uuid.UUID, now: datetime
) -> list[Order]:
    """What `agent_id` must be told now, derived from the jobs' state (so a lost order is
    sent again, and the agent's ledger drops a repeat): each attempt assigned to it and
    not yet started, and a cancel for each of its attempts whose job was cancelled."""
    stmt = (
        select(JobRow, JobAttemptRow.gpu_uuids)
        .join(
            JobAttemptRow,
            (JobAttemptRow.job_id == JobRow.job_id) & (JobAttemptRow.attempt == JobRow.attempt),
        )
        .where(JobRow.agent_id == agent_id, JobRow.state.in_(OUT))
        .order_by(JobRow.updated_at, JobRow.job_id)
    )
    issued_at = now.timestamp()
    orders = []
    async with sessions() as session:
        for job, gpus in (await session.execute(stmt)).all():
            if job.cancel_requested_at is not None:
                orders.append(Order("cancel", agent_id, job.job_id, job.attempt, issued_at))
            elif job.state == "assigned":
                checkpoint = await _restored(session, job)
                payload = JobSpec.parse(job.spec).assignment(gpus, checkpoint)
                orders.append(Order("assign", agent_id, job.job_id, job.attempt, issued_at,
                                    payload))  # fmt: skip
    return orders


async def _restored(session: AsyncSession, job: JobRow) -> str | None:
    """The checkpoint an attempt starts from: none for a first attempt (nothing could
    have saved one), else the latest an earlier attempt saved."""
    if job.attempt <= 1:
        return None
    restore = await latest_checkpoint(session, job.job_id, job.attempt)
    return None if restore is None else restore.manifest


async def lose_offline(
    sessions: async_sessionmaker[AsyncSession], *, now: datetime
) -> list[uuid.UUID]:
    """Every attempt out on an agent that is offline or no longer registered is lost; an
    attempt assigned (not yet started) on one that stopped accepting jobs (its owner came
    back, or it restarted without them) is handed back, no retry used. Level-triggered,
    so it holds across restarts: whatever marked the agent offline (the sweep, its
    goodbye), the next pass finds its attempts. Returns the jobs moved.

    A *running* attempt on an online agent that stopped accepting new jobs keeps running:
    the agent itself ends what it must, and says so."""
    out = JobRow.state.in_(OUT)
    async with sessions() as session:
        gone = (
            select(JobRow.agent_id, AgentRow.status)
            .outerjoin(AgentRow, AgentRow.agent_id == JobRow.agent_id)
            .where(out, or_(AgentRow.status.is_(None), AgentRow.status != "online"))
            .distinct()
        )
        lost = [(a, status) for a, status in (await session.execute(gone)).all() if a]
        closed = (
            select(JobRow.agent_id)
            .join(AgentRow, AgentRow.agent_id == JobRow.agent_id)
            .where(
                JobRow.state == "assigned",
                AgentRow.status == "online",
                AgentRow.accepts_jobs.is_(False),
            )
            .distinct()
        )
        handed_back = [a for a in (await session.scalars(closed)).all() if a]
    moved: list[uuid.UUID] = []
    for agent_id, status in lost:
        why = "its desktop left" if status is None else "its desktop went offline"
        moved += await lose_agent(sessions, agent_id=agent_id, now=now, why=why)
    why = "its desktop stopped accepting jobs"
    for agent_id in handed_back:
        moved += await lose_agent(
            sessions, agent_id=agent_id, now=now, states=("assigned",), outcome="refused", why=why
        )
    return moved


async def lose_agent(
    sessions: async_sessionmaker[AsyncSession],
    *,
    agent_id: uuid.UUID,
    now: datetime,
    why: str = "its desktop went offline",
    states: tuple[str, ...] = OUT,
    outcome: Outcome = "lost",
) -> list[uuid.UUID]:
    """End every attempt the agent has out in `states` as `outcome`: lost (it went
    offline: jobs with retries left go back to the queue, the others end `lost`) or
    refused (handed back: queued again, no retry used). Returns the jobs moved."""
    async with sessions.begin() as session:
        ids = (
            await session.scalars(
                select(JobRow.job_id).where(JobRow.agent_id == agent_id, JobRow.state.in_(states))
            )
        ).all()
        for job_id in ids:
            job = await _locked(session, job_id)
            if job is not None and job.state in states:
                await _end(session, job, Report("ended", outcome, detail=why), now, by="sweep")
    return list(ids)


async def _locked(session: AsyncSession, job_id: uuid.UUID) -> JobRow | None:
    stmt = select(JobRow).where(JobRow.job_id == job_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


async def _record_use(session: AsyncSession, job: JobRow, vram_gb: Mapping[str, float]) -> None:
    """How far the attempt has grown on each GPU it claims: a job that outgrew its claim
    holds what it uses (docs/jobs.md, the VRAM rule)."""
    await repo.record_use(session, job_id=job.job_id, attempt=job.attempt, vram_gb=vram_gb)


async def _start(
    session: AsyncSession, job: JobRow, now: datetime, *, log_path: str | None = None
) -> None:
    await repo.start_attempt(session, job=job, log_path=log_path, now=now)


async def _end(
    session: AsyncSession, job: JobRow, said: Report, now: datetime, *, by: Mover = "agent"
) -> None:
    """End the attempt as `said`, release its claims, and move the job on: to its final
    state, or back to the queue when the attempt was refused, or lost or failed with a
    retry left (the contract's table, `schemas.dispatch.next_state`)."""
    assert said.outcome is not None
    where = await _agent_named(session, job.agent_id) if said.never_ran() else ""
    to_state = _next_state(job, said)
    reason = _words(job, said, where, again=to_state == "queued")
    await repo.end_attempt(
        session, job=job, to_state=to_state, by=by, reason=reason, now=now,
        attempt_state=attempt_ended(said.outcome, to_state), exit_code=said.exit_code,
        signal=said.signal, peak_vram_gb=said.vram_gb,
        spent_retry=spends_retry(said.outcome, to_state),
        preempted=said.outcome == "preempted",
    )  # fmt: skip


async def _agent_named(session: AsyncSession, agent_id: uuid.UUID | None) -> str:
    """The agent as a user knows it: its registered name, else its id."""
    stmt = select(AgentRow.name).where(AgentRow.agent_id == agent_id)
    name = None if agent_id is None else await session.scalar(stmt)
    return name or str(agent_id)


def _next_state(job: JobRow, said: Report, *, retries_used: int | None = None) -> str:
    assert said.outcome is not None
    spec = JobSpec.parse(job.spec)
    used = job.retries_used if retries_used is None else retries_used
    return next_state(said.outcome, said.exit_code, retries_left=spec.retries_left(used),
                      retry_on_exit=spec.retry_on_exit)  # fmt: skip


def _words(job: JobRow, said: Report, where: str = "", *, again: bool) -> str:
    """Why the job moved, in a user's words. `where`: the agent's name (for a start
    failure); `again`: it went back to the queue."""
    detail = f": {said.detail}" if said.detail else ""
    retrying = "; retrying" if again else ""
    match said.outcome:
        case "refused":
            return f"refused by {job.agent_id}{detail}; placed again"
        case "preempted":  # the owner took the desktop back: no retry used
            return f"attempt {job.attempt} {said.detail or 'preempted'}; placed again"
        case "lost":
            return f"attempt {job.attempt} lost{detail}{retrying}"
        case "cancelled" | "timed_out":  # the state says which; the detail why
            return said.detail or str(said.outcome)
    if said.exit_code == 0:
        return "exited 0"
    return f"{_how_exited(said, detail, where)}{retrying}"


def _how_exited(said: Report, detail: str, where: str) -> str:
    if said.signal is not None:
        return f"killed by signal {said.signal}{detail}"
    if said.never_ran():  # no made-up exit code: say why, and where
        return f"{said.detail or 'it could not be started'} on {where}"
    return f"exited {said.exit_code}{detail}"


# An attempt placed less than this before an agent's latest heartbeat was sent may be
# missing from it only because its order had not arrived yet (the snapshot was taken
# first, or the heartbeat was delivered late): `lose_forgotten` leaves it alone.
FORGOTTEN_MARGIN = timedelta(seconds=30)


async def lose_forgotten(
    sessions: async_sessionmaker[AsyncSession], *, now: datetime
) -> list[uuid.UUID]:
    """End as lost every attempt out on an online agent whose heartbeats list what it holds
    (`attempts_held`: running, or ended and not yet heard) and no longer list it: the agent
    lost it without a word (killed before it saved anything, its directory gone). Its job
    is placed again while it has retries. An attempt whose end the agent saved is listed
    until its end is heard, so it keeps its outcome (docs/reliability.md). Returns the
    jobs moved."""
    async with sessions() as session:
        stmt = (
            select(JobRow.job_id, JobRow.attempt, JobRow.agent_id, JobAttemptRow.assigned_at,
                   AgentRow.last_sent_at, AgentRow.resource_metrics)
            .join(JobAttemptRow, (JobAttemptRow.job_id == JobRow.job_id)
                  & (JobAttemptRow.attempt == JobRow.attempt))
            .join(AgentRow, AgentRow.agent_id == JobRow.agent_id)
            .where(JobRow.state.in_(OUT), AgentRow.status == "online")
        )  # fmt: skip
        rows = (await session.execute(stmt)).all()
    forgotten = [
        (row.job_id, row.attempt, row.agent_id)
        for row in rows
        if _forgotten(
            row.job_id, row.attempt, row.assigned_at, row.last_sent_at, row.resource_metrics
        )
    ]
    moved: list[uuid.UUID] = []
    for job_id, attempt, agent_id in forgotten:
        said = Report("ended", "lost", detail="its desktop no longer has it")
        async with sessions.begin() as session:
            job = await _locked(session, job_id)
            if job is None or (job.attempt, job.agent_id) != (attempt, agent_id):
                continue
            if is_out(job.state):
                log.warning("attempt %s of %s is no longer held by its agent %s: lost",
                            attempt, job_id, agent_id)  # fmt: skip
                await _end(session, job, said, now, by="sweep")
                moved.append(job_id)
    return moved


def _forgotten(
    job_id: uuid.UUID,
    attempt: int,
    assigned_at: datetime | None,
    heard_sent_at: datetime | None,
    metrics: Mapping[str, Any] | None,
) -> bool:
    held = (metrics or {}).get("attempts_held")
    if not isinstance(held, list) or assigned_at is None or heard_sent_at is None:
        return False  # an agent that does not say what it holds is not judged by it
    if heard_sent_at < assigned_at + FORGOTTEN_MARGIN:
        return False
    return f"{job_id}/{attempt}" not in held


async def _late_end(
    session: AsyncSession, job: JobRow, agent_id: uuid.UUID, attempt: int, said: Report,
    now: datetime,
) -> bool:  # fmt: skip
    """The saved outcome of an attempt judged `lost` (its desktop went silent while the
    database or the orchestrator was away, then its agent's outbox said how it ended):
    the outcome wins while the job has placed no later attempt. Its retry is given back.
    Whether it applied."""
    if job.attempt != attempt or job.state not in ("queued", "lost"):
        return False
    row = await session.get(JobAttemptRow, (job.job_id, attempt))
    if row is None or row.agent_id != agent_id or row.state != "lost":
        return False
    given_back = job.retries_used - 1 if job.state == "queued" else job.retries_used
    to_state = _next_state(job, said, retries_used=max(0, given_back))
    if to_state not in LATE_ENDS:
        return False  # a retry it asks for is already under way
    reason = _words(job, said, again=False)
    await repo.late_end_attempt(
        session, job=job, agent_id=agent_id, to_state=to_state, retries_used=max(0, given_back),
        reason=f"{reason} (heard after it was judged lost)", attempt_reason=reason,
        exit_code=said.exit_code, signal=said.signal, now=now,
    )  # fmt: skip
    return True
