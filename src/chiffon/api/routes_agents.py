"""Registry reads, the capacity query and deregistration."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import UUID_TEXT, AgentIdDep, OrchestratorDep, SessionDep, parse_agent_id
from chiffon.orchestrator import capacity, views
from chiffon.persistence import jobs as jobs_repo
from chiffon.persistence import registry
from chiffon.persistence.registry import CapacityFilter
from chiffon.schemas import limits
from chiffon.schemas.api import (
    AgentCapacity,
    AgentEvent,
    AgentRecord,
    AgentStatus,
    ErrorDetail,
    RotatedSecret,
)
from chiffon.schemas.metrics import BOUNDS

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/api/v1", tags=["agents"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail},
    400: {"model": ErrorDetail},
}
LabelSelector = Annotated[
    list[Annotated[str, Query(max_length=320, pattern=r"^[A-Za-z0-9_.\-/]{1,63}=[^\x00-\x1f]*$")]]
    | None,
    Query(description="key=value; repeatable, every one must match (like `kubectl -l`)"),
]


def _bounds(**given: float | None) -> dict[str, float | None]:
    return given


# One query parameter per capacity bound a metric declares (schemas.metrics.BOUNDS).
_bounds.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            bound.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                metric.kind | None,
                Query(
                    ge=bound.low,
                    le=bound.high,
                    description=bound.help.removesuffix("."),
                    allow_inf_nan=False if metric.kind is float else None,
                ),
            ],
        )
        for metric, bound in BOUNDS
    ]
)
BoundsDep = Annotated[dict[str, float | None], Depends(_bounds)]


def _labels(selector: list[str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(tuple(item.split("=", 1)) for item in selector or ())  # type: ignore[misc]


@router.get("/agents", response_model=list[AgentRecord])
async def list_agents(
    session: SessionDep,
    orchestrator: OrchestratorDep,
    status: AgentStatus | None = None,
    agent_type: Annotated[str | None, Query(max_length=64, pattern=limits.TEXT_PATTERN)] = None,
    pool_name: Annotated[str | None, Query(max_length=128, pattern=limits.TEXT_PATTERN)] = None,
    label: LabelSelector = None,
) -> list[AgentRecord]:
    """Every registered agent, optionally filtered."""
    rows = await registry.list_agents(
        session, status=status, agent_type=agent_type, pool_name=pool_name, labels=_labels(label)
    )
    now = orchestrator.clock.now()
    record = await jobs_repo.setbacks(session, now=now)
    return [views.record(row, now, record.get(row.agent_id, (0, 0))) for row in rows]


@router.get("/agents/available-capacity", response_model=list[AgentCapacity], responses=_NOT_FOUND)
async def available_capacity(
    session: SessionDep,
    orchestrator: OrchestratorDep,
    bounds: BoundsDep,
    pool_name: Annotated[str | None, Query(max_length=128, pattern=limits.TEXT_PATTERN)] = None,
    agent_type: Annotated[
        str, Query(max_length=64, pattern=limits.TEXT_PATTERN, description="'any' for every type")
    ] = "desktop",
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    label: LabelSelector = None,
) -> list[AgentCapacity]:
    """Online agents that meet every requirement, most free VRAM first. Cores, memory and
    VRAM free are net of what running jobs hold (`claims`).

    The first entry is the best agent. An empty list means no one can take the work now.
    """
    want = CapacityFilter(
        bounds=bounds,
        pool_name=pool_name,
        agent_type=None if agent_type == "any" else agent_type,
        limit=limit,
        labels=_labels(label),
    )
    started = time.perf_counter()
    found = await capacity.available(session, want=want, now=orchestrator.clock.now())
    orchestrator.metrics.query_seconds.labels("available_capacity").observe(
        time.perf_counter() - started
    )
    return found


@router.get("/agents/{agent_id}", response_model=AgentRecord, responses=_NOT_FOUND)
async def get_agent(
    agent_id: AgentIdDep, session: SessionDep, orchestrator: OrchestratorDep
) -> AgentRecord:
    """One agent's full record."""
    row = await registry.get_agent(session, agent_id=agent_id)
    if row is None:
        raise HTTPException(404, f"agent {agent_id} is not registered")
    now = orchestrator.clock.now()
    record = await jobs_repo.setbacks(session, now=now, agent_ids=[agent_id])
    return views.record(row, now, record.get(agent_id, (0, 0)))


@router.get("/agents/{agent_id}/capacity", response_model=AgentCapacity, responses=_NOT_FOUND)
async def get_capacity(
    agent_id: AgentIdDep, session: SessionDep, orchestrator: OrchestratorDep
) -> AgentCapacity:
    """One agent's capacity: the seeds' fields (net of what running jobs hold), each GPU,
    and the metrics' age."""
    found = await capacity.one(session, agent_id=agent_id, now=orchestrator.clock.now())
    if found is None:
        raise HTTPException(404, f"agent {agent_id} is not registered")
    return found


@router.delete("/agents/{agent_id}", status_code=204, responses=_NOT_FOUND)
async def deregister(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> Response:
    """Remove an agent from the registry (its event history stays)."""
    if not await orchestrator.deregister(agent_id):
        raise HTTPException(404, f"agent {agent_id} is not registered")
    return Response(status_code=204)


@router.delete("/agents/{agent_id}/credential", status_code=204, responses=_NOT_FOUND)
async def revoke_credential(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> Response:
    """Revoke an agent's secret and ban its id: its messages are refused, and it cannot
    enroll again until the ban is lifted (`DELETE /agents/{agent_id}/ban`)."""
    if not await orchestrator.credentials.revoke(agent_id):
        raise HTTPException(404, f"agent {agent_id} holds no active credential")
    log.warning("credential of agent %s revoked; the id is banned until lifted", agent_id)
    return Response(status_code=204)


@router.delete("/agents/{agent_id}/ban", status_code=204, responses=_NOT_FOUND)
async def lift_ban(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> Response:
    """Lift a revoked agent's ban: it may enroll again (with the enrollment token)."""
    if not await orchestrator.credentials.lift_ban(agent_id):
        raise HTTPException(404, f"agent {agent_id} is not banned")
    log.warning("ban of agent %s lifted; it may enroll again", agent_id)
    return Response(status_code=204)


@router.post("/agents/{agent_id}/approve", status_code=204, responses=_NOT_FOUND)
async def approve(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> Response:
    """Let an enrolled agent take jobs (agents enrolled with the plain enrollment token wait
    for this, unless CHIFFON_AUTO_APPROVE is set)."""
    if not await orchestrator.credentials.trust(agent_id, approve=True, clear=False):
        raise HTTPException(404, f"agent {agent_id} holds no active credential")
    log.warning("agent %s approved: it may take jobs", agent_id)
    orchestrator.dispatcher.wake()
    return Response(status_code=204)


@router.post("/agents/{agent_id}/clear", status_code=204, responses=_NOT_FOUND)
async def clear(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> Response:
    """Lift a `suspect` quarantine: the admin judged both senders to be the agent (it was
    run twice). To shut a thief out, rotate its secret instead (`POST .../rotate`)."""
    if not await orchestrator.credentials.trust(agent_id, approve=False, clear=True):
        raise HTTPException(404, f"agent {agent_id} holds no active credential")
    log.warning("agent %s cleared of suspicion: it may take jobs", agent_id)
    orchestrator.dispatcher.wake()
    return Response(status_code=204)


@router.post("/agents/{agent_id}/rotate", response_model=RotatedSecret, responses=_NOT_FOUND)
async def rotate(agent_id: AgentIdDep, orchestrator: OrchestratorDep) -> RotatedSecret:
    """A new secret for the agent, shown once: the old one is refused from now on, on every
    orchestrator, and a suspicion is cleared (whoever copied the old one is shut out). Put
    it in the agent's state directory (`chiffon agents rotate` does, on that desktop) and
    restart the agent."""
    credential = await orchestrator.credentials.rotate(agent_id)
    if credential is None:
        raise HTTPException(404, f"agent {agent_id} holds no active credential")
    log.warning("secret of agent %s rotated: the old one is refused", agent_id)
    return RotatedSecret(agent_id=agent_id, secret=credential.secret)


@router.get("/events", response_model=list[AgentEvent])
async def list_events(
    session: SessionDep,
    agent_id: Annotated[str | None, Query(max_length=64, json_schema_extra=UUID_TEXT)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AgentEvent]:
    """Status changes, newest first: when each agent went online or offline, and why."""
    wanted = None if agent_id is None else await parse_agent_id(agent_id)
    rows = await registry.list_events(session, agent_id=wanted, limit=limit)
    return [views.event(row) for row in rows]


@router.get("/agents/{agent_id}/events", response_model=list[AgentEvent], responses=_NOT_FOUND)
async def agent_events(
    agent_id: AgentIdDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AgentEvent]:
    """One agent's status history, newest first."""
    rows = await registry.list_events(session, agent_id=agent_id, limit=limit)
    return [views.event(row) for row in rows]
