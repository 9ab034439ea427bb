"""Metrics history: tiers, the rows ingest writes, the points the API reads, pruning.

Each tier keeps one point per `resolution_seconds` bucket per agent: the values of the
first heartbeat heard in that bucket (0 means every heartbeat). A sample, not an average:
a coarse bucket is written once and never updated, so the ingest path writes about
1 + 1/4 + 1/60 rows per heartbeat at a 15 s interval instead of three, the same rule holds
for every number including the per-GPU list, and a point is always a snapshot an agent
really reported.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.clock import Clock
from chiffon.persistence import history
from chiffon.persistence.models import AgentMetricsRow
from chiffon.schemas.api import AgentMetrics, GpuPoint, MetricPoint
from chiffon.schemas.heartbeat import AgentMessage

log = logging.getLogger(__name__)

# Charts read about this many points when the caller gives no step.
DEFAULT_POINTS = 300


@dataclass(frozen=True, slots=True)
class Tier:
    resolution_seconds: int
    retention_seconds: float


def bucket_start(at: datetime, resolution_seconds: int) -> datetime:
    """The start of the bucket holding `at` (UTC, aligned to the epoch)."""
    if resolution_seconds <= 0:
        return at
    epoch = math.floor(at.timestamp() / resolution_seconds) * resolution_seconds
    return datetime.fromtimestamp(epoch, UTC)


def point_values(message: AgentMessage) -> dict[str, Any]:
    """The numbers a heartbeat contributes to the history."""
    res = message.resources
    assert res is not None  # only heartbeats are sampled
    return {
        "cpu_load_1min": res.cpu_load_1min,
        "cpu_cores_available": res.cpu_cores_available,
        "cpu_cores_physical": res.cpu_cores_physical,
        "memory_available_gb": res.memory_available_gb,
        "memory_total_gb": res.memory_total_gb,
        "gpu_vram_available_gb": res.gpu_vram_available_gb,
        "gpu_vram_total_gb": res.gpu_vram_total_gb,
        "gpus": [
            {
                "index": gpu.index,
                "vram_free_gb": gpu.vram_free_gb,
                "vram_total_gb": gpu.vram_total_gb,
                "utilization_percent": gpu.utilization_percent,
            }
            for gpu in res.gpus
        ],
    }


class HistoryRecorder:
    """Picks the history rows a batch writes: each tier's bucket once, its first heartbeat.

    Coarse buckets this process already wrote are skipped in memory, without a round trip;
    a bucket another orchestrator wrote first is skipped by the database (ON CONFLICT DO
    NOTHING). `committed` must follow a successful commit, so that a failed batch's
    buckets are written again when its messages come back.
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = tuple(tiers)
        self._written: dict[tuple[uuid.UUID, int], datetime] = {}
        self._pending: list[tuple[uuid.UUID, int, datetime]] = []

    def rows(self, samples: Sequence[tuple[AgentMessage, datetime]]) -> list[dict[str, Any]]:
        """Rows for a batch's applied heartbeats (with receipt times, in order)."""
        rows: dict[tuple[uuid.UUID, int, datetime], dict[str, Any]] = {}
        for message, received_at in samples:
            for tier in self.tiers:
                start = bucket_start(received_at, tier.resolution_seconds)
                key = (message.agent_id, tier.resolution_seconds, start)
                if key in rows or self._written.get(key[:2]) == start:
                    continue
                rows[key] = {
                    "agent_id": message.agent_id,
                    "resolution_seconds": tier.resolution_seconds,
                    "bucket_start": start,
                    "sampled_at": received_at,
                    **point_values(message),
                }
        self._pending = [key for key in rows if key[1] > 0]
        return list(rows.values())

    def committed(self) -> None:
        """The last `rows` are durable: remember their coarse buckets."""
        for agent_id, resolution, start in self._pending:
            self._written[(agent_id, resolution)] = start
        self._pending = []


def choose_tier(
    tiers: Sequence[Tier], *, since: datetime, now: datetime, step_seconds: float
) -> Tier:
    """The finest tier no finer than needed that still reaches back to `since`."""
    by_resolution = sorted(tiers, key=lambda t: t.resolution_seconds)
    covering = [t for t in by_resolution if now - timedelta(seconds=t.retention_seconds) <= since]
    fitting = [t for t in covering if t.resolution_seconds <= step_seconds]
    if fitting:
        return fitting[-1]
    if covering:
        return covering[0]
    return max(by_resolution, key=lambda t: t.retention_seconds)


def thin(rows: Sequence[AgentMetricsRow], step_seconds: float) -> list[AgentMetricsRow]:
    """Keep the last row of each `step_seconds` bucket (rows oldest first)."""
    if step_seconds <= 0:
        return list(rows)
    kept: dict[int, AgentMetricsRow] = {}
    for row in rows:
        kept[math.floor(row.bucket_start.timestamp() / step_seconds)] = row
    return list(kept.values())


def _point(row: AgentMetricsRow) -> MetricPoint:
    return MetricPoint(
        at=row.bucket_start,
        cpu_load_1min=row.cpu_load_1min,
        cpu_cores_available=row.cpu_cores_available,
        cpu_cores_physical=row.cpu_cores_physical,
        memory_available_gb=row.memory_available_gb,
        memory_total_gb=row.memory_total_gb,
        gpu_vram_available_gb=row.gpu_vram_available_gb,
        gpu_vram_total_gb=row.gpu_vram_total_gb,
        gpus=[GpuPoint.model_validate(gpu) for gpu in row.gpus],
    )


async def read_metrics(
    session: AsyncSession,
    tiers: Sequence[Tier],
    *,
    agent_id: uuid.UUID,
    since: datetime,
    until: datetime,
    now: datetime,
    step_seconds: float | None,
) -> AgentMetrics:
    """An agent's points in [since, until], at most one per `step_seconds`."""
    step = step_seconds or (until - since).total_seconds() / DEFAULT_POINTS
    tier = choose_tier(tiers, since=since, now=now, step_seconds=step)
    rows = await history.list_points(
        session,
        agent_id=agent_id,
        resolution_seconds=tier.resolution_seconds,
        since=bucket_start(since, tier.resolution_seconds),
        until=until,
    )
    return AgentMetrics(
        agent_id=agent_id,
        since=since,
        until=until,
        step_seconds=step,
        resolution_seconds=tier.resolution_seconds,
        points=[_point(row) for row in thin(rows, step)],
    )


class HistoryPruner:
    """Deletes each tier's points older than its retention: one DELETE per tier."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, tiers: Sequence[Tier]
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._tiers = tuple(tiers)

    async def prune_once(self) -> dict[int, int]:
        """One pass; returns rows deleted per resolution."""
        now = self._clock.now()
        deleted: dict[int, int] = {}
        async with self._sessions.begin() as session:
            for tier in self._tiers:
                deleted[tier.resolution_seconds] = await history.prune_tier(
                    session,
                    resolution_seconds=tier.resolution_seconds,
                    before=now - timedelta(seconds=tier.retention_seconds),
                )
        if any(deleted.values()):
            log.info("pruned metrics history: %s", deleted)
        return deleted

    async def run(self, interval_seconds: float) -> None:
        """Prune forever on a monotonic schedule; a failed pass is logged and retried."""
        next_at = time.monotonic()
        while True:
            try:
                await self.prune_once()
            except Exception as exc:  # database down: the next pass will try again
                log.warning("metrics history pruning failed: %s", exc)
            next_at = max(next_at + interval_seconds, time.monotonic())
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
