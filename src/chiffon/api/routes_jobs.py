"""Jobs, the user's side: submit, list, show, cancel. All with the API token.

Part of issue 22 (jobs): a job submitted here is queued and placed on an agent that
accepts jobs, but no agent can accept jobs yet, so it waits and says why (docs/jobs.md).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from sqlalchemy import select

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import UUID_TEXT, OrchestratorDep, SessionDep
from chiffon.persistence.models import JobAttemptRow, JobEventRow, JobRow
from chiffon.schemas.api import ErrorDetail
from chiffon.schemas.jobs import (
    JobAccepted,
    JobAttempt,
    JobDetail,
    JobEvent,
    JobState,
    JobSubmit,
    JobView,
)

router = APIRouter(
    prefix="/api/v1", tags=["jobs"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 404, 413, 422, 503)
}


async def parse_job_id(
    job_id: Annotated[str, Path(json_schema_extra=UUID_TEXT, description="the job's UUID")],
) -> uuid.UUID:
    """A path id, or 400 when it is not a UUID."""
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise HTTPException(400, f"job_id {job_id[:64]!r} is not a UUID") from None


JobIdDep = Annotated[uuid.UUID, Depends(parse_job_id)]


def view(job: JobRow) -> JobView:
    return JobView(
        job_id=job.job_id,
        name=job.name,
        state=job.state,
        reason=job.reason,
        attempt=job.attempt,
        agent_id=job.agent_id,
        cancel_requested=job.cancel_requested_at is not None,
        command=job.spec["command"],
        requirements=job.spec.get("requirements", {}),
        submitted_at=job.submitted_at,
        updated_at=job.updated_at,
        ended_at=job.ended_at,
        exit_code=job.exit_code,
    )


@router.post("/jobs", status_code=201, response_model=JobAccepted, responses=_ERRORS)
async def submit(
    spec: JobSubmit, orchestrator: OrchestratorDep, session: SessionDep
) -> JobAccepted:
    """Queue a command to run once on a desktop that has room for it."""
    job_id, warning = await orchestrator.submit_job(spec)
    job = await session.get(JobRow, job_id)
    assert job is not None
    return JobAccepted(job=view(job), warning=warning)


@router.get("/jobs", response_model=list[JobView], responses=_ERRORS)
async def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    agent_id: Annotated[uuid.UUID | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[JobView]:
    """Jobs, newest first."""
    stmt = select(JobRow).order_by(JobRow.submitted_at.desc(), JobRow.job_id).limit(limit)
    if state is not None:
        stmt = stmt.where(JobRow.state == state)
    if agent_id is not None:
        stmt = stmt.where(JobRow.agent_id == agent_id)
    return [view(job) for job in (await session.scalars(stmt)).all()]


@router.get("/jobs/{job_id}", response_model=JobDetail, responses=_ERRORS)
async def show(job_id: JobIdDep, session: SessionDep) -> JobDetail:
    """One job with its attempts and its events (why it waits, how each attempt ended)."""
    job = await session.get(JobRow, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    attempts = (
        await session.scalars(
            select(JobAttemptRow)
            .where(JobAttemptRow.job_id == job_id)
            .order_by(JobAttemptRow.attempt)
        )
    ).all()
    events = (
        await session.scalars(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
        )
    ).all()
    return JobDetail(
        **view(job).model_dump(),
        attempts=[JobAttempt.model_validate(a, from_attributes=True) for a in attempts],
        events=[JobEvent.model_validate(e, from_attributes=True) for e in events],
    )


@router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=_ERRORS)
async def cancel(job_id: JobIdDep, orchestrator: OrchestratorDep, session: SessionDep) -> JobView:
    """Cancel: at once when queued; when running, its desktop ends it (SIGTERM, then
    SIGKILL after the grace period). Cancelling again changes nothing."""
    if await orchestrator.cancel_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id}")
    job = await session.get(JobRow, job_id, populate_existing=True)
    assert job is not None
    return view(job)
