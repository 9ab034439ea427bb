"""The capacity answer net of claims: what a new job could still be given.

The registry's columns hold what each agent *sees* free. While jobs run, some of that is
promised (a job that has not yet grown into its claim), so the answer subtracts the live
claims with the same rule placement uses (`ledger`; docs/jobs.md). Net is
never more than seen, so the SQL filter on the seen numbers keeps every agent that may
qualify; the agents holding claims are then recomputed and filtered again. When no agent
in the SQL's answer holds a claim, that answer is the whole answer, in one query.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chiffon.orchestrator import ledger, views
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
    claims = await repo.claims_by_agent(session, agent_ids=[r.agent_id for r in rows if r.claimed])
    found = [c for row in rows if meets(c := net(row, claims.get(row.agent_id, []), now), want)]
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
    less = await _promised_beyond_seen(session, claims, now)
    return [_less(t, less[t.pool_name]) if t.status == "online" and t.pool_name in less else t
            for t in totals]  # fmt: skip


async def _promised_beyond_seen(
    session: AsyncSession, claims: dict[uuid.UUID, list[JobClaimRow]], now: datetime
) -> dict[str, tuple[int, float]]:
    """Pool -> (cores, VRAM GB) its online agents' claims promise beyond what they see in
    use."""
    less: dict[str, tuple[int, float]] = {}
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
    return less


def _less(t: PoolTotals, less: tuple[int, float]) -> PoolTotals:
    cores, vram = less
    return dataclasses.replace(
        t,
        cpu_cores_available=t.cpu_cores_available - cores,
        gpu_vram_available_gb=round(t.gpu_vram_available_gb - vram, 3),
    )


def net(row: Any, claims: Sequence[JobClaimRow], now: datetime) -> AgentCapacity:
    """One agent's capacity with its claims taken off (`ledger`)."""
    seen = views.capacity(row, now)
    if not claims:
        return seen
    gpus = ledger.gpu_ledgers((row.resource_metrics or {}).get("gpus", []), claims)
    known = [g.available_gb for g in gpus if g.known]
    cores = ledger.cores_left(row.cpu_cores_available, row.cpu_cores_physical, claims)
    return seen.model_copy(
        update={
            "cpu_cores_available": None if cores is None else int(cores),  # whole cores
            "memory_available_gb": ledger.memory_left(row.memory_available_gb, claims),
            "gpu_vram_available_gb": round(sum(known), 3) if known else None,
            "gpu_vram_available_max_gb": round(max(known), 3) if known else None,
            "claims": _totals(claims),
        }
    )


def _totals(claims: Sequence[JobClaimRow]) -> ClaimTotals:
    return ClaimTotals(
        jobs=len({(x.job_id, x.attempt) for x in claims}),
        cpu_cores=sum(x.cpu_cores or 0.0 for x in claims),
        memory_gb=sum(x.memory_gb or 0.0 for x in claims),
        vram_gb=sum(x.vram_gb or 0.0 for x in claims),
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
