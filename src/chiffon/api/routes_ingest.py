"""The HTTP heartbeat path for fleets without a broker: same body, same ingest handler."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from chiffon.api.deps import AgentIdDep, OrchestratorDep
from chiffon.orchestrator.batcher import IngestUnavailableError
from chiffon.schemas.api import ErrorDetail, IngestResult
from chiffon.schemas.heartbeat import AgentMessage, MessageKind, RejectedMessage

router = APIRouter(prefix="/api/v1", tags=["ingest"])

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": AgentMessage.model_json_schema()}},
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 413, 422, 503)
}


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 before parsing when it is over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body is {declared} bytes, limit {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _ingest(
    kind: MessageKind, agent_id: AgentIdDep, request: Request, orchestrator: OrchestratorDep
) -> IngestResult:
    raw = await read_capped(request, orchestrator.settings.max_message_bytes)
    try:
        message = orchestrator.parse(raw)
    except RejectedMessage as exc:
        raise HTTPException(422, f"{exc.reason}: {exc.detail}") from None
    if message.agent_id != agent_id or message.kind != kind:
        orchestrator.reject("path_mismatch")
        raise HTTPException(
            422,
            f"body is a {message.kind} of agent {message.agent_id}, "
            f"the path a {kind} of {agent_id}",
        )
    try:
        outcome = await orchestrator.receive(message)
    except IngestUnavailableError:
        raise HTTPException(503, "registry database unavailable; retry later") from None
    return IngestResult(agent_id=agent_id, outcome=outcome)


@router.post(
    "/agents/{agent_id}/heartbeat",
    response_model=IngestResult,
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def heartbeat(
    agent_id: AgentIdDep, request: Request, orchestrator: OrchestratorDep
) -> IngestResult:
    """An agent's heartbeat (`kind: heartbeat`); registers an unknown agent."""
    return await _ingest("heartbeat", agent_id, request, orchestrator)


@router.post(
    "/agents/{agent_id}/offline",
    response_model=IngestResult,
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def goodbye(
    agent_id: AgentIdDep, request: Request, orchestrator: OrchestratorDep
) -> IngestResult:
    """An agent's goodbye (`kind: offline`): marks it offline at once."""
    return await _ingest("offline", agent_id, request, orchestrator)
