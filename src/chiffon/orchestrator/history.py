"""Metrics history: tiers, the periodic recorder, the points the API reads, pruning.

History is kept out of the ingest path. A recorder task copies every online agent's
current numbers from the registry into `agent_metrics` on a schedule: one point per
heartbeat interval for the full-resolution tier, one at each minute and quarter-hour
boundary for the coarse tiers. Each point is a sample of what the agent last reported,
not an average, so every number (the per-GPU list included) is a snapshot an agent really
sent, and a tick costs one `INSERT ... SELECT` per tier whose bucket has just begun,
whatever the fleet's size or the heartbeat rate.
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

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.periodic import run_every
from chiffon.persistence import history
from chiffon.persistence.models import AgentMetricsRow
from chiffon.schemas.api import AgentMetrics, GpuPoint, MetricPoint
from chiffon.schemas.metrics import HISTORY

log = logging.getLogger(__name__)

# Charts read about this many points when the caller gives no step.
DEFAULT_POINTS = 300
# Wake this long after a bucket boundary, so that the tick lands inside the new bucket.
TICK_MARGIN_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Tier:
    """One history tier.

    `resolution_seconds` names the tier in the database (0: full resolution); the tier
    keeps one point per `period_seconds` (the heartbeat interval at full resolution,
    `resolution_seconds` otherwise) for `retention_seconds`.
    """

    resolution_seconds: int
    retention_seconds: float
    period_seconds: float = 0

    def __post_init__(self) -> None:
        if self.every_seconds <= 0:
            raise ValueError(f"tier {self.resolution_seconds} needs a period above 0 seconds")

    @property
    def every_seconds(self) -> float:
        return self.period_seconds or float(self.resolution_seconds)


def bucket_start(at: datetime, resolution_seconds: float) -> datetime:
    """The start of the bucket holding `at` (UTC, aligned to the epoch)."""
    if resolution_seconds <= 0:
        return at
    epoch = math.floor(at.timestamp() / resolution_seconds) * resolution_seconds
    return datetime.fromtimestamp(epoch, UTC)


class HistoryRecorder:
    """Records each tier's bucket once, when the orchestrator's clock enters it.

    A tick writes only the tiers whose bucket began since this recorder last wrote one;
    a bucket another orchestrator recorded first is left alone by the database (ON
    CONFLICT DO NOTHING), so replicas may all run a recorder. Agents are recorded while
    online and heard within `heard_within_seconds` (the liveness timeout), so that an
    orchestrator starting over an old registry does not stamp stale numbers as new.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        metrics: OrchestratorMetrics,
        tiers: Sequence[Tier],
        *,
        heard_within_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._metrics = metrics
        self.tiers = tuple(tiers)
        self._heard_within = timedelta(seconds=heard_within_seconds)
        self._recorded: dict[int, datetime] = {}

    def due(self, now: datetime) -> list[tuple[Tier, datetime]]:
        """The tiers whose current bucket this recorder has not written yet."""
        buckets = [(tier, bucket_start(now, tier.every_seconds)) for tier in self.tiers]
        return [(t, b) for t, b in buckets if self._recorded.get(t.resolution_seconds) != b]

    async def record_once(self) -> dict[int, int]:
        """One tick; returns the rows written per tier (only the tiers that were due)."""
        now = self._clock.now()
        due = self.due(now)
        if not due:
            return {}
        started = time.perf_counter()
        written: dict[int, int] = {}
        async with self._sessions.begin() as session:
            for tier, bucket in due:
                written[tier.resolution_seconds] = await history.record_online(
                    session,
                    resolution_seconds=tier.resolution_seconds,
                    bucket_start=bucket,
                    heard_since=now - self._heard_within,
                )
        # Only after the commit: a failed tick is tried again while its bucket lasts.
        for tier, bucket in due:
            self._recorded[tier.resolution_seconds] = bucket
        self._metrics.history_record_seconds.observe(time.perf_counter() - started)
        return written

    def seconds_to_next_tick(self) -> float:
        """Until just after the next bucket boundary of any tier, by the clock."""
        now = self._clock.now()
        waits = [
            (bucket_start(now, t.every_seconds) - now).total_seconds() + t.every_seconds
            for t in self.tiers
        ]
        return max(TICK_MARGIN_SECONDS, min(waits, default=60.0) + TICK_MARGIN_SECONDS)

    async def run(self) -> None:
        """Tick at every bucket boundary forever; a failed tick is logged and retried.

        Buckets are aligned to the wall clock (the epoch), so the schedule follows the
        clock rather than a monotonic deadline: a tick that wakes a little early finds
        nothing due and sleeps the rest of the way.
        """
        while True:
            try:
                await self.record_once()
            except Exception as exc:  # database down: the next tick will try again
                log.warning("metrics history recording failed: %s", exc)
            await asyncio.sleep(self.seconds_to_next_tick())


def choose_tier(
    tiers: Sequence[Tier], *, since: datetime, now: datetime, step_seconds: float
) -> Tier:
    """The finest tier no finer than needed that still reaches back to `since`.

    A tier covers a window that starts up to one of its periods before its retention: a
    dashboard asking for "the last hour" a few milliseconds late still reads the
    full-resolution tier that keeps an hour (pruning runs every few minutes anyway).
    """
    by_resolution = sorted(tiers, key=lambda t: t.every_seconds)

    def reaches(tier: Tier) -> bool:
        oldest = now - timedelta(seconds=tier.retention_seconds + tier.every_seconds)
        return oldest <= since

    covering = [t for t in by_resolution if reaches(t)]
    fitting = [t for t in covering if t.every_seconds <= step_seconds]
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
        **{m.name: getattr(row, m.name) for m in HISTORY},
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
        since=bucket_start(since, tier.every_seconds),
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
        await run_every(interval_seconds, self.prune_once, "metrics history pruning")
