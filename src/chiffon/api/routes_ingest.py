"""The HTTP heartbeat path for fleets without a broker: same body, same ingest handler."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError

from chiffon.api.auth import EnrollGrantDep, bearer_token, unauthorized
from chiffon.api.deps import AgentIdDep, OrchestratorDep
from chiffon.orchestrator.batcher import IngestUnavailableError
from chiffon.orchestrator.credentials import AlreadyEnrolledError, BannedError, TokenSpentError
from chiffon.schemas.api import EnrollRequest, EnrollResponse, ErrorDetail, IngestResult
from chiffon.schemas.heartbeat import AgentMessage, MessageKind, RejectedMessage
from chiffon.transport.auth import Bearer, ProofUnavailableError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["ingest"])


def _request_schemas() -> dict[str, dict[str, Any]]:
    """The bodies these routes read themselves (after the credential, never before), for
    the OpenAPI document's components: the agent's message and what it nests, under names of
    their own (the API's `GpuInfo` is the response form), and the enrollment request."""
    message = AgentMessage.model_json_schema(
        ref_template="#/components/schemas/AgentMessage{model}"
    )
    nested = message.pop("$defs", {})
    return {
        "AgentMessage": message,
        **{f"AgentMessage{name}": schema for name, schema in nested.items()},
        "EnrollRequest": EnrollRequest.model_json_schema(),
    }


REQUEST_SCHEMAS = _request_schemas()


def _body(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


_BODY = _body("AgentMessage")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 401, 413, 422, 503)
}


# Refusals a credential would fix: 401 with WWW-Authenticate; every other one is a 422.
_AUTH_REASONS = frozenset(
    {"unauthenticated", "not_enrolled", "bad_credential", "bad_signature", "revoked", "clock_skew"}
)


async def _ingest(
    kind: MessageKind, agent_id: AgentIdDep, request: Request, orchestrator: OrchestratorDep
) -> IngestResult:
    # The credential first (the path names the agent): a stranger's body is never read.
    # The app's `BodyLimit` bounds what is read after.
    try:
        await orchestrator.check_bearer(agent_id, bearer_token(request))
        message = await orchestrator.admit(await request.body(), Bearer(agent_id), kind=kind)
        outcome = await orchestrator.receive(message)
    except RejectedMessage as exc:
        if exc.reason in _AUTH_REASONS:
            raise unauthorized(f"{exc.reason}: {exc.detail}") from None
        raise HTTPException(422, f"{exc.reason}: {exc.detail}") from None
    except (IngestUnavailableError, ProofUnavailableError):
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


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses={code: {"model": ErrorDetail} for code in (400, 401, 403, 409, 413, 422, 503)},
    openapi_extra=_body("EnrollRequest"),
)
async def enroll(
    request: Request, orchestrator: OrchestratorDep, grant: EnrollGrantDep
) -> EnrollResponse:
    """A new agent's secret, in exchange for the enrollment token (`CHIFFON_ENROLL_TOKEN`,
    or one made by `chiffon tokens create`, whose use this spends).

    Once per agent: an agent that holds a credential must be revoked first
    (`chiffon agents revoke AGENT_ID`), so no one can take over another agent's identity.
    The agent takes no jobs until an admin approves it (`chiffon agents approve`), unless
    the token approves (the API token, an approving made token, or CHIFFON_AUTO_APPROVE).
    The body is read only after the token is checked (a body parameter would be read
    first).
    """
    try:
        body = EnrollRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(_problems(exc))) from None
    outcomes = orchestrator.metrics.enrollments
    client = request.client.host if request.client else "?"
    try:
        credential = await orchestrator.credentials.issue(
            body.agent_id, approved=grant.approved, token_sha256=grant.made_token_sha256
        )
    except TokenSpentError:
        outcomes.labels("bad_token").inc()
        raise unauthorized("invalid, used up or expired enrollment token") from None
    except BannedError:
        outcomes.labels("banned").inc()
        log.warning("enrollment of revoked agent %s from %s refused", body.agent_id, client)
        raise HTTPException(
            403,
            f"agent {body.agent_id} was revoked; an operator lifts the ban with "
            f"`chiffon agents unban {body.agent_id}`",
        ) from None
    except AlreadyEnrolledError:
        outcomes.labels("already_enrolled").inc()
        log.warning(
            "enrollment of agent %s from %s refused: already enrolled", body.agent_id, client
        )
        raise HTTPException(
            409,
            f"agent {body.agent_id} is already enrolled; to give it a new secret run "
            f"`chiffon agents revoke {body.agent_id}`, then `chiffon agents unban "
            f"{body.agent_id}`",
        ) from None
    outcomes.labels("issued").inc()
    _say_enrolled(body.agent_id, client, approved=grant.approved)
    return EnrollResponse(
        agent_id=credential.agent_id, secret=credential.secret, approved=grant.approved
    )


def _say_enrolled(agent_id: object, client: str, *, approved: bool) -> None:
    """One log line per enrollment; a pending agent's says what the admin must run."""
    if approved:
        log.info("enrolled agent %s from %s", agent_id, client)
        return
    log.warning(
        "enrolled agent %s from %s: pending, it takes no jobs until an admin runs "
        "`chiffon agents approve %s`",
        agent_id,
        client,
        agent_id,
    )


def _problems(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    ]
