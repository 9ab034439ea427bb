"""The capacity answer net of claims: what a new job could still be given.

The registry's columns hold what each agent *sees* free. While jobs run, some of that is
promised (a job that has not yet grown into its claim), so the answer subtracts the live
claims with the same rule placement uses (`placement.GpuLedger`; docs/jobs.md). Net is
never more than seen, so the SQL filter on the seen numbers keeps every agent that may
qualify; the agents holding claims are then recomputed and filtered again. When no agent
in the SQL's answer holds a claim, that answer is the whole answer, in one query.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.orchestrator import views
from chiffon.orchestrator.scheduler import candidate
from chiffon.persistence import jobs as repo
from chiffon.persistence import registry
from chiffon.persistence.models import JobClaimRow
from chiffon.persistence.registry import CapacityFilter, PoolTotals
from chiffon.schemas.api import AgentCapacity, ClaimTotals
from chiffon.schemas.metrics import BOUNDS


async def available(
    session: AsyncSession, *, want: CapacityFilter, now: datetime
) -> list[AgentCapacity]:
    """Online agents meeting every requirement net of claims, most free VRAM first.

    One query when none of the agents it answers holds claims: then each one's numbers are
    already net, and no agent it left out could rank above them (net is never more than
    seen). Otherwise the agents holding claims are netted and the answer filtered and
    ordered again, from every agent the seen numbers let through (the limit after)."""
    rows = await registry.find_capacity(session, want=want)
    if not any(row.claimed for row in rows):
        return [views.capacity(row, now) for row in rows]
    if want.limit is not None:
        rows = await registry.find_capacity(session, want=dataclasses.replace(want, limit=None))
    held = [row.agent_id for row in rows if row.claimed]
    claims = await repo.claims_by_agent(session, agent_ids=held)
    found = [net(row, claims.get(row.agent_id, []), now) for row in rows]
    found = [c for c in found if meets(c, want)]
    found.sort(key=_best_first)
    return found[: want.limit] if want.limit else found


async def one(session: AsyncSession, *, agent_id: uuid.UUID, now: datetime) -> AgentCapacity | None:
    row = await registry.get_agent(session, agent_id=agent_id)
    if row is None:
        return None
    claims = await repo.claims_by_agent(session, agent_ids=[agent_id])
    return net(row, claims.get(agent_id, []), now)


async def pool_totals(session: AsyncSession, *, now: datetime) -> list[PoolTotals]:
    """`registry.pool_totals` with the online agents' free cores and VRAM net of claims."""
    totals = await registry.pool_totals(session)
    claims = await repo.claims_by_agent(session)
    if not claims:
        return totals
    less: dict[str, tuple[int, float]] = {}  # pool -> (cores, VRAM GB) promised beyond seen
    for agent_id, held in claims.items():
        row = await registry.get_agent(session, agent_id=agent_id)
        if row is None or row.status != "online":
            continue
        seen, after = views.capacity(row, now), net(row, held, now)
        cores, vram = less.get(row.pool_name, (0, 0.0))
        less[row.pool_name] = (
            cores + (seen.cpu_cores_available or 0) - (after.cpu_cores_available or 0),
            vram + (seen.gpu_vram_available_gb or 0.0) - (after.gpu_vram_available_gb or 0.0),
        )
    return [
        dataclasses.replace(
            t,
            cpu_cores_available=t.cpu_cores_available - less[t.pool_name][0],
            gpu_vram_available_gb=round(t.gpu_vram_available_gb - less[t.pool_name][1], 3),
        )
        if t.status == "online" and t.pool_name in less
        else t
        for t in totals
    ]


def net(row: Any, claims: Sequence[JobClaimRow], now: datetime) -> AgentCapacity:
    """One agent's capacity with its claims taken off."""
    seen = views.capacity(row, now)
    if not claims:
        return seen
    c = candidate(cast("Row[Any]", _CandidateRow(row)), claims)
    known = [g.available_gb for g in c.gpus if g.total_gb is not None and g.foreign_gb is not None]
    totals = ClaimTotals(
        jobs=len({(x.job_id, x.attempt) for x in claims}),
        cpu_cores=sum(x.cpu_cores or 0.0 for x in claims),
        memory_gb=sum(x.memory_gb or 0.0 for x in claims),
        vram_gb=sum(x.vram_gb or 0.0 for x in claims),
    )
    return seen.model_copy(
        update={
            "cpu_cores_available": _whole(c.cpu_cores_available),
            "memory_available_gb": c.memory_available_gb,
            "gpu_vram_available_gb": round(sum(known), 3) if known else None,
            "gpu_vram_available_max_gb": round(max(known), 3) if known else None,
            "claims": totals,
        }
    )


def meets(c: AgentCapacity, want: CapacityFilter) -> bool:
    for metric, bound in BOUNDS:
        asked = want.bounds.get(bound.param)
        if asked is None:
            continue
        have = getattr(c, metric.name)
        if have is None or (have < asked if bound.op == "min" else have > asked):
            return False
    return True


def _best_first(c: AgentCapacity) -> tuple[Any, ...]:
    def desc(value: float | None) -> tuple[bool, float]:
        return (value is None, -(value or 0.0))

    return (*desc(c.gpu_vram_available_gb), *desc(c.cpu_cores_available),
            *desc(c.memory_available_gb), str(c.agent_id))  # fmt: skip


def _whole(cores: float | None) -> int | None:
    """Free cores are whole cores (the registry's column is an integer)."""
    return None if cores is None else int(cores)


class _CandidateRow:
    """A capacity row as `scheduler.candidate` reads one (it wants a few more names)."""

    def __init__(self, row: Row[Any] | Any) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        if name == "accepts_jobs":
            return getattr(self._row, name, False)
        if name == "hold":  # an admin's hold changes no number
            return getattr(self._row, name, None)
        if name == "labels":
            return getattr(self._row, name, {})
        return getattr(self._row, name)
