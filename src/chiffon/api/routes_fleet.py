"""The fleet summary and each agent's metrics history."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AfterValidator, BeforeValidator

from chiffon.api.auth import UNAUTHORIZED, ApiTokenDep
from chiffon.api.deps import AgentIdDep, OrchestratorDep, SessionDep
from chiffon.orchestrator import capacity, views
from chiffon.orchestrator.history import read_metrics
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


def _iso_only(value: object) -> object:
    """ISO 8601, as documented (`format: date-time`): pydantic would also take a bare
    number as a Unix time, which the OpenAPI document does not promise."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        raise ValueError("must be an ISO 8601 time, e.g. 2026-12-02T10:00:00Z")
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
QueryTime = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_as_utc)]


@router.get("/fleet/summary", response_model=FleetSummary)
async def fleet_summary(session: SessionDep, orchestrator: OrchestratorDep) -> FleetSummary:
    """Agents online and offline, and the online agents' cores and VRAM, by pool; free
    cores and VRAM net of what running jobs hold."""
    totals = await capacity.pool_totals(session, now=orchestrator.clock.now())
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
        Query(ge=1, le=86400 * 31, description="seconds between points; default: window/300"),
    ] = None,
) -> AgentMetrics:
    """One agent's history (load, free cores, memory, VRAM per GPU, utilization).

    Read from the finest stored tier that still covers `since`; at most one point (the
    last heartbeat) per `step` seconds.
    """
    now = orchestrator.clock.now()
    end = until or now
    # At most MAX_WINDOW is read (an older `since` starts there); a window that is empty
    # (`since` at or after `until`) holds no points. Both are answers, not errors: every
    # pair of valid times is a valid question (the OpenAPI document cannot say otherwise).
    start = max(since or end - DEFAULT_WINDOW, end - MAX_WINDOW)
    if start >= end:
        empty = step or 0.0
        return AgentMetrics(
            agent_id=agent_id, since=end, until=end, step_seconds=empty, resolution_seconds=0,
            points=[],
        )  # fmt: skip
    return await read_metrics(
        session,
        orchestrator.settings.history_tiers,
        agent_id=agent_id,
        since=start,
        until=end,
        now=now,
        step_seconds=step,
    )
