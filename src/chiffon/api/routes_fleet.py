"""The fleet summary and each agent's metrics history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import AfterValidator

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import AgentIdDep, OrchestratorDep, SessionDep
from chiffon.orchestrator import views
from chiffon.orchestrator.history import read_metrics
from chiffon.persistence import registry
from chiffon.schemas import limits
from chiffon.schemas.api import AgentMetrics, ErrorDetail, FleetSummary

router = APIRouter(
    prefix="/api/v1", tags=["fleet"], dependencies=[ApiTokenDep], responses=UNAUTHORIZED
)

_ERRORS: dict[int | str, dict[str, Any]] = {400: {"model": ErrorDetail}}
DEFAULT_WINDOW = timedelta(hours=1)
MAX_WINDOW = timedelta(days=400)


def _as_utc(at: datetime) -> datetime:
    """Query times without a zone are taken as UTC; others converted (or a 400 when that
    leaves the calendar: year 9999 at -14:00)."""
    return limits.utc(at if at.tzinfo is not None else at.replace(tzinfo=UTC))


QueryTime = Annotated[datetime, AfterValidator(_as_utc)]


@router.get("/fleet/summary", response_model=FleetSummary)
async def fleet_summary(session: SessionDep, orchestrator: OrchestratorDep) -> FleetSummary:
    """Agents online and offline, and the online agents' cores and VRAM, by pool."""
    totals = await registry.pool_totals(session)
    summary = views.fleet_summary(
        totals,
        now=orchestrator.clock.now(),
        heartbeat_timeout_seconds=orchestrator.settings.heartbeat_timeout_seconds,
    )
    summary.registry_stale_seconds = orchestrator.registry_stale_seconds()
    return summary


@router.get("/agents/{agent_id}/metrics", response_model=AgentMetrics, responses=_ERRORS)
async def agent_metrics(
    agent_id: AgentIdDep,
    session: SessionDep,
    orchestrator: OrchestratorDep,
    since: Annotated[
        QueryTime | None, Query(description="default: one hour before `until`")
    ] = None,
    until: Annotated[QueryTime | None, Query(description="default: now")] = None,
    step: Annotated[
        float | None,
        Query(gt=0, le=86400 * 31, description="seconds between points; default: window/300"),
    ] = None,
) -> AgentMetrics:
    """One agent's history (load, free cores, memory, VRAM per GPU, utilization).

    Read from the finest stored tier that still covers `since`; at most one point (the
    last heartbeat) per `step` seconds.
    """
    now = orchestrator.clock.now()
    end = until or now
    start = since or end - DEFAULT_WINDOW
    if not timedelta(0) < end - start <= MAX_WINDOW:
        raise HTTPException(400, f"since must be before until, at most {MAX_WINDOW.days} days")
    return await read_metrics(
        session,
        orchestrator.settings.history_tiers,
        agent_id=agent_id,
        since=start,
        until=end,
        now=now,
        step_seconds=step,
    )
