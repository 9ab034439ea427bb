"""Jobs, the agent's side over HTTP: its orders (a long-poll) and its reports of attempts.

The agent's `transport.http.HttpWork` calls these (docs/jobs.md). All take the agent's
own secret as the bearer credential, checked before any body is read, as heartbeats do.
Orders come signed with the agent's order key: the agent checks them whatever carried
them.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chiffon.api.auth import bearer_token, unauthorized
from chiffon.api.deps import AgentIdDep, JobIdDep, OrchestratorDep
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas import dispatch, limits
from chiffon.schemas.api import ErrorDetail
from chiffon.schemas.heartbeat import RejectedMessage
from chiffon.transport.auth import ProofUnavailableError

router = APIRouter(prefix="/api/v1", tags=["work"])


class SignedOrder(BaseModel):
    body: str = Field(description="the order's JSON, exactly as signed")
    signature: str = Field(description="v1=<hex HMAC-SHA256 under the agent's order key>")


class Orders(BaseModel):
    orders: list[SignedOrder]


# Absolute, and printable as the rest of a report's text (limits.TEXT_PATTERN's characters).
LogPath = Annotated[
    str,
    Field(
        min_length=2,
        max_length=dispatch.LOG_PATH_MAX_CHARS,
        pattern=f"^/{limits.TEXT_PATTERN.removeprefix('^')}",
    ),
]
GpuId = Annotated[str, Field(min_length=1, max_length=160, pattern=limits.TEXT_PATTERN)]
VramByGpu = Annotated[
    dict[GpuId, Annotated[float, Field(ge=0, le=limits.GPU_GB_MAX)]], Field(max_length=64)
]


class AttemptReport(BaseModel):
    """What an agent says of one attempt."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: dispatch.ReportKind
    outcome: dispatch.Outcome | None = None
    exit_code: (
        Annotated[int, Field(ge=dispatch.EXIT_CODE_MIN, le=dispatch.EXIT_CODE_MAX)] | None
    ) = Field(
        None,
        description="ended, outcome `exit`: the exit status; null with no `signal`: the "
        "program never started (`detail` says why)",
    )
    signal: Annotated[int, Field(ge=dispatch.SIGNAL_MIN, le=dispatch.SIGNAL_MAX)] | None = None
    detail: Annotated[
        str, Field(max_length=dispatch.DETAIL_MAX_CHARS, pattern=limits.TEXT_PATTERN)
    ] = ""
    runtime_seconds: Annotated[float, Field(ge=0, le=1e9)] | None = None
    vram_gb: VramByGpu | None = Field(
        None, description="usage: VRAM its processes hold now, by GPU id"
    )
    peak_vram_gb: VramByGpu | None = Field(None, description="ended: the most they held")
    log_path: LogPath | None = Field(
        None,
        description="started: the absolute path of the attempt's whole output on the "
        "desktop (older agents leave it out)",
    )


class AttemptVerdict(BaseModel):
    verdict: dispatch.Verdict = Field(
        description="stale: not the job's current attempt on this agent; end it"
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 401, 413, 422, 503)
}
_REPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": AttemptReport.model_json_schema()}},
    }
}


async def the_agent(orchestrator: Orchestrator, agent_id: uuid.UUID, request: Request) -> None:
    try:
        await orchestrator.check_bearer(agent_id, bearer_token(request))
    except RejectedMessage as exc:
        raise unauthorized(f"{exc.reason}: {exc.detail}") from None
    except ProofUnavailableError:
        raise HTTPException(503, "registry database unavailable; retry later") from None


@router.get("/agents/{agent_id}/orders", response_model=Orders, responses=_ERRORS)
async def orders(
    agent_id: AgentIdDep,
    request: Request,
    orchestrator: OrchestratorDep,
    wait: Annotated[
        float, Query(ge=0, le=30, description="seconds to wait for an order when none is due")
    ] = 0,
) -> Orders:
    """What this agent must be told now: assignments not yet started, cancels."""
    await the_agent(orchestrator, agent_id, request)
    try:
        signed = await orchestrator.wait_orders(agent_id, wait_seconds=wait)
    except RejectedMessage as exc:  # revoked while waiting
        raise unauthorized(f"{exc.reason}: {exc.detail}") from None
    return Orders(orders=[SignedOrder(body=b.decode(), signature=s) for b, s in signed])


@router.post(
    "/agents/{agent_id}/attempts/{job_id}/{attempt}",
    response_model=AttemptVerdict,
    responses=_ERRORS,
    openapi_extra=_REPORT_BODY,
)
async def attempt_report(
    agent_id: AgentIdDep,
    job_id: JobIdDep,
    attempt: Annotated[int, Path(ge=1, le=2**31 - 1)],
    request: Request,
    orchestrator: OrchestratorDep,
) -> AttemptVerdict:
    """An attempt started, or ended (and how). The body is read after the credential."""
    await the_agent(orchestrator, agent_id, request)
    try:
        said = AttemptReport.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HTTPException(422, f"{where}: {first['msg']}") from None
    if said.kind == "ended" and said.outcome is None:
        raise HTTPException(422, "outcome: an ended attempt says how it ended")
    report = dispatch.report_from(said.model_dump())
    verdict = await orchestrator.report_attempt(agent_id, job_id, attempt, report)
    return AttemptVerdict(verdict=verdict)


@router.post(
    "/agents/{agent_id}/attempts/{job_id}/{attempt}/log",
    response_model=AttemptVerdict,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def attempt_log(
    agent_id: AgentIdDep,
    job_id: JobIdDep,
    attempt: Annotated[int, Path(ge=1, le=2**31 - 1)],
    offset: Annotated[int, Query(ge=0, le=2**62, description="the chunk's byte offset")],
    request: Request,
    orchestrator: OrchestratorDep,
) -> AttemptVerdict:
    """A chunk of the attempt's output (raw bytes), at its offset in the desktop's log."""
    await the_agent(orchestrator, agent_id, request)
    data = await request.body()
    verdict = await orchestrator.ship_log(agent_id, job_id, attempt, offset, data)
    return AttemptVerdict(verdict=verdict)
