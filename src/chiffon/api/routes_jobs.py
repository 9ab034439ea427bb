"""Jobs, the user's side: submit, list, show, cancel, logs. Submit and cancel need the API
token; the read-only token reads (`api.auth`).

A job submitted here is queued and placed on an agent that accepts jobs; until one fits,
it waits and says why (docs/jobs.md).
"""

from __future__ import annotations

import hashlib
import uuid
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query
from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep, BearerDep
from chiffon.api.deps import JobIdDep, OrchestratorDep, SessionDep
from chiffon.orchestrator import views
from chiffon.orchestrator.jobs import KeyReusedError
from chiffon.orchestrator.longpoll import TooManyLongPolls
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import IDEMPOTENCY_KEY_MAX_CHARS, JobRow
from chiffon.schemas.api import ErrorDetail
from chiffon.schemas.dispatch import JobState
from chiffon.schemas.jobs import (
    JobAccepted,
    JobDetail,
    JobLog,
    JobSubmit,
    JobView,
)

router = APIRouter(
    prefix="/api/v1", tags=["jobs"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 404, 413, 422, 503)
}


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX_CHARS,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="A key of the client's (a UUID, say), new for each job it means to "
        "submit. Sent again within a day with the same submission (a retry after a lost "
        "reply), the answer is that first submission's job, and nothing is created; "
        "with another submission, 409.",
    ),
]


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobAccepted,
    responses={**_ERRORS, 409: {"model": ErrorDetail}},
)
async def submit(
    spec: JobSubmit,
    orchestrator: OrchestratorDep,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    """Queue a command to run once on a desktop that has room for it. With an
    `Idempotency-Key` already given in the last day, the job it created (the same 201),
    and no other."""
    if spec.snapshot is not None:
        try:
            await orchestrator.store.complete(spec.snapshot)
        except (LookupError, ValueError) as exc:
            raise HTTPException(422, f"snapshot: {exc}") from None
    try:
        job_id, warning = await orchestrator.submit_job(spec, idempotency_key=idempotency_key)
    except KeyReusedError as exc:
        raise HTTPException(409, str(exc)) from None
    return JobAccepted(job=await _view(session, job_id), warning=warning)


@router.get("/jobs", response_model=list[JobView], responses=_ERRORS)
async def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    agent_id: Annotated[uuid.UUID | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[JobView]:
    """Jobs, newest first."""
    rows = await repo.list_jobs(session, state=state, agent_id=agent_id, limit=limit)
    names = await repo.agent_names(session, agent_ids=[row.agent_id for row in rows])
    current = await repo.current_attempts(session, jobs=rows)
    return [views.job(row, names, current) for row in rows]


@router.get("/jobs/{job_id}", response_model=JobDetail, responses=_ERRORS)
async def show(job_id: JobIdDep, session: SessionDep, orchestrator: OrchestratorDep) -> JobDetail:
    """One job with its attempts and its events (why it waits, how each attempt ended)."""
    job = await _job(session, job_id)
    attempts, events = await repo.history(session, job_id=job_id)
    ids = [job.agent_id, *(a.agent_id for a in attempts)]
    names = await repo.agent_names(session, agent_ids=ids)
    cut = await repo.log_bytes_cut(session, job_id=job_id)
    saved = await orchestrator.store.saved(job_id)
    snapshot = job.spec.get("snapshot")
    fetched = await orchestrator.store.fetched_by(snapshot) if snapshot else None
    return views.job_detail(job, attempts, events, names, cut, saved, fetched)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=_ERRORS)
async def cancel(job_id: JobIdDep, orchestrator: OrchestratorDep, session: SessionDep) -> JobView:
    """Cancel: at once when queued; when running, its desktop ends it (SIGTERM, then
    SIGKILL after the grace period). Cancelling again changes nothing."""
    if await orchestrator.cancel_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    return await _view(session, job_id)


_TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorDetail,
        "description": "this token already holds `CHIFFON_LONG_POLLS_PER_TOKEN` log "
        "long-polls open; ask again after `Retry-After` seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }
}


@router.get("/jobs/{job_id}/logs", response_model=JobLog, responses={**_ERRORS, **_TOO_MANY})
async def logs(
    job_id: JobIdDep,
    orchestrator: OrchestratorDep,
    credentials: BearerDep,
    attempt: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1024 * 1024)] = 256 * 1024,
    wait: Annotated[
        float, Query(ge=0, le=30, description="seconds to wait for output when none is new")
    ] = 0,
) -> JobLog:
    """The job's output from `offset` (its current attempt unless `attempt` is given).
    Follow it by asking again from `next_offset` with `wait` until `done`. A token holds
    at most `CHIFFON_LONG_POLLS_PER_TOKEN` requests with `wait` open at once (429 past
    it)."""
    token = "" if credentials is None else credentials.credentials  # checked by the router
    with _long_poll(orchestrator, token) if wait > 0 else nullcontext():
        log = await orchestrator.read_log(
            job_id, attempt=attempt, offset=offset, limit=limit, wait_seconds=wait
        )
    if log is None:
        raise HTTPException(404, f"no job {job_id}")
    return log


def _long_poll(orchestrator: Orchestrator, token: str) -> AbstractContextManager[None]:
    """One of the token's long-poll slots (the token known by its digest only), or 429
    before anything is read."""
    try:
        return orchestrator.long_polls.slot(hashlib.sha256(token.encode()).hexdigest())
    except TooManyLongPolls as exc:
        raise HTTPException(
            429, str(exc), headers={"Retry-After": str(exc.retry_after_seconds)}
        ) from None


async def _view(session: AsyncSession, job_id: uuid.UUID) -> JobView:
    job = await _job(session, job_id)
    names = await repo.agent_names(session, agent_ids=[job.agent_id])
    return views.job(job, names, await repo.current_attempts(session, jobs=[job]))


async def _job(session: AsyncSession, job_id: uuid.UUID) -> JobRow:
    job = await session.get(JobRow, job_id, populate_existing=True)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job
