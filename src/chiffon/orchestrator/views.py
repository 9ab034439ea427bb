"""Registry rows turned into the API's models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Row

from chiffon.orchestrator.jobspec import JobSpec
from chiffon.orchestrator.store import Saved
from chiffon.persistence.jobs import Current
from chiffon.persistence.models import (
    AgentEventRow,
    AgentRow,
    JobAttemptRow,
    JobEventRow,
    JobRow,
)
from chiffon.persistence.registry import PoolTotals
from chiffon.schemas.api import (
    AgentCapacity,
    AgentEvent,
    AgentRecord,
    FleetSummary,
    PoolSummary,
    Reliability,
)
from chiffon.schemas.jobs import JobAttempt, JobDetail, JobEvent, JobView
from chiffon.schemas.metrics import REGISTRY


def _age(at: datetime | None, now: datetime) -> float | None:
    return None if at is None else round(max(0.0, (now - at).total_seconds()), 3)


def capacity(row: AgentRow | Row[Any], now: datetime) -> AgentCapacity:
    """From an `AgentRow` or a row of `registry.CAPACITY_COLUMNS`."""
    metrics = row.resource_metrics or {}
    return AgentCapacity(
        agent_id=row.agent_id,
        name=row.name,
        pool_name=row.pool_name,
        agent_type=row.agent_type,
        status=row.status,
        **{m.name: getattr(row, m.name) for m in REGISTRY},
        gpus=metrics.get("gpus", []),  # validated as GpuInfo by the model, in one call
        timestamp=row.last_heartbeat_at if metrics else None,
        age_seconds=_age(row.last_heartbeat_at, now) if metrics else None,
        probe_errors=metrics.get("probe_errors", {}),
    )


def record(row: AgentRow, now: datetime, setbacks: tuple[int, int] = (0, 0)) -> AgentRecord:
    """`setbacks`: its offline events and preemptions over 7 days (persistence.jobs)."""
    return AgentRecord(
        agent_id=row.agent_id,
        name=row.name,
        agent_type=row.agent_type,
        pool_name=row.pool_name,
        agent_version=row.agent_version,
        labels=row.labels,
        capabilities=row.capabilities,
        specializations=row.specializations,
        status=row.status,
        accepts_jobs=row.accepts_jobs and row.hold is None,
        hold=row.hold,
        hold_reason=row.hold_reason,
        last_heartbeat_at=row.last_heartbeat_at,
        age_seconds=_age(row.last_heartbeat_at, now),
        resource_metrics=row.resource_metrics,
        sandbox=(row.resource_metrics or {}).get("sandbox"),
        reliability=Reliability(offline_events_7d=setbacks[0], preemptions_7d=setbacks[1]),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def event(row: AgentEventRow) -> AgentEvent:
    return AgentEvent(
        agent_id=row.agent_id,
        at=row.at,
        from_status=row.from_status,
        to_status=row.to_status,
        reason=row.reason,
    )


def job(
    row: JobRow,
    names: Mapping[UUID, str] | None = None,
    current: Mapping[UUID, Current] | None = None,
) -> JobView:
    """`current`: its current attempt, when it has one out or ended on one
    (`persistence.jobs.current_attempts`). Of its environment, only the names."""
    now = (current or {}).get(row.job_id) if row.agent_id else None
    spec = JobSpec.parse(row.spec)
    return JobView(
        job_id=row.job_id,
        name=row.name,
        state=row.state,
        reason=row.reason,
        attempt=row.attempt,
        preemptions=row.preemptions or 0,
        agent_id=row.agent_id,
        agent_name=(names or {}).get(row.agent_id) if row.agent_id else None,
        gpu_uuids=now.gpu_uuids if now else [],
        cancel_requested=row.cancel_requested_at is not None,
        command=list(spec.command),
        requirements=spec.wants.stored(),
        submitted_at=row.submitted_at,
        updated_at=row.updated_at,
        started_at=now.started_at if now else None,
        ended_at=row.ended_at,
        exit_code=row.exit_code,
        workdir=spec.workdir,
        timeout_seconds=spec.timeout_seconds,
        env_names=sorted(spec.env),
        snapshot=spec.snapshot,
        outputs=list(spec.outputs),
    )


def job_detail(
    row: JobRow,
    attempts: Sequence[JobAttemptRow],
    events: Sequence[JobEventRow],
    names: Mapping[UUID, str],
    log_bytes_cut: Mapping[int, int] | None = None,
    checkpoints: Sequence[Saved] = (),
    fetched: Mapping[UUID, datetime] | None = None,
) -> JobDetail:
    """`log_bytes_cut`: by attempt, the bytes at the start of its output no longer kept
    (`persistence.jobs.log_bytes_cut`; absent: none). `checkpoints`: those the job's
    attempts saved (`store.BlobStore.saved`), to say which each attempt resumed from;
    `fetched`: when each agent first fetched its snapshot (`store.BlobStore.fetched_by`;
    None: the job has no snapshot)."""
    held = [Current(list(a.gpu_uuids), a.started_at) for a in attempts if a.attempt == row.attempt]
    cut = log_bytes_cut or {}
    tried = [attempt(a, names, cut.get(a.attempt, 0), resumed(a, checkpoints)) for a in attempts]
    if fetched is not None:
        for seen, a in zip(tried, attempts, strict=True):
            at = fetched.get(a.agent_id)
            seen.snapshot_cached = at is not None and at < a.assigned_at
    return JobDetail(
        **job(row, names, {row.job_id: held[0]} if held else {}).model_dump(),
        attempts=tried,
        events=[JobEvent.model_validate(e, from_attributes=True) for e in events],
    )


def resumed(row: JobAttemptRow, checkpoints: Sequence[Saved]) -> Saved | None:
    """The checkpoint the attempt started with: the last one an earlier attempt saved
    before it started (the order carries the latest when the agent takes it)."""
    before = [c for c in checkpoints if c.kind == "checkpoint" and c.attempt < row.attempt
              and (row.started_at is None or c.saved_at <= row.started_at)]  # fmt: skip
    return max(before, key=lambda c: c.saved_at, default=None)


def attempt(
    row: JobAttemptRow, names: Mapping[UUID, str], log_bytes_cut: int, start: Saved | None = None
) -> JobAttempt:
    return JobAttempt(
        attempt=row.attempt,
        agent_id=row.agent_id,
        agent_name=names.get(row.agent_id),
        state=row.state,
        gpu_uuids=row.gpu_uuids,
        assigned_at=row.assigned_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        exit_code=row.exit_code,
        signal=row.signal,
        reason=row.reason,
        peak_vram_gb=row.peak_vram_gb,
        log_path=row.log_path,
        log_bytes_cut=log_bytes_cut,
        resumed_from=start.attempt if start else None,
        resumed_bytes=start.bytes if start else None,
    )


def _pool_summary(pool_name: str | None, totals: Sequence[PoolTotals]) -> PoolSummary:
    online = [t for t in totals if t.status == "online"]
    return PoolSummary(
        pool_name=pool_name,
        agents_online=sum(t.agents for t in online),
        agents_offline=sum(t.agents for t in totals if t.status != "online"),
        cpu_cores_physical=sum(t.cpu_cores_physical for t in online),
        cpu_cores_available=sum(t.cpu_cores_available for t in online),
        gpu_count=sum(t.gpu_count for t in online),
        gpu_vram_total_gb=round(sum(t.gpu_vram_total_gb for t in online), 3),
        gpu_vram_available_gb=round(sum(t.gpu_vram_available_gb for t in online), 3),
    )


def fleet_summary(
    totals: Sequence[PoolTotals], *, now: datetime, heartbeat_timeout_seconds: float
) -> FleetSummary:
    """Per-pool and fleet-wide counts from the database's (pool, status) sums."""
    pools = sorted({t.pool_name for t in totals})
    return FleetSummary(
        generated_at=now,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        fleet=_pool_summary(None, totals),
        pools=[_pool_summary(p, [t for t in totals if t.pool_name == p]) for p in pools],
    )
