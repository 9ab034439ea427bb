"""The offline sweep: agents silent for longer than the timeout are marked offline.

An orchestrator that could not hear anyone (it just started, its broker link was down, or
the database refused the writes that record what it heard) must not conclude that everyone
died: `grant_grace` gives every agent a full heartbeat interval plus its timeout of fresh
hearing from that moment before the sweep may judge it (Nomad resets its heartbeat TTLs
after a leader change the same way). The interval covers a heartbeat the agent had queued
or is backing off to send again; the timeout is the ordinary one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.periodic import run_every
from chiffon.persistence import registry
from chiffon.persistence.registry import StatusEvent

log = logging.getLogger(__name__)

# Above this share of the online fleet going silent in one sweep, say so loudly.
MASS_OFFLINE_FRACTION = 0.5
NO_ONE = datetime(1, 1, 1, tzinfo=UTC)  # the cutoff of a sweep in grace: no one is heard before


class Sweeper:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        metrics: OrchestratorMetrics,
        *,
        timeout_seconds: float,
        interval_seconds: float = 0.0,
        hearing: Callable[[], bool] = lambda: True,
        went_offline: Callable[[], None] = lambda: None,
    ) -> None:
        self._sessions = sessions
        self._went_offline = went_offline  # told when a sweep marked agents offline
        self._hearing = hearing  # asked at every sweep: can every receiver hear its agents?
        self._clock = clock
        self._metrics = metrics
        self._timeout = timedelta(seconds=timeout_seconds)
        # The agents' heartbeat interval plus the timeout: what grace gives every agent.
        self._grace = timedelta(seconds=interval_seconds + timeout_seconds)
        self._not_before: datetime = clock.now() + self._grace
        self._deaf = False
        self._away = False  # the registry was unreachable: grace once it takes a write
        # When a sweep last ran to the end while the orchestrator could hear (monotonic):
        # past a few intervals the registry's statuses are stale (`stale_seconds`).
        self.last_completed = time.monotonic()

    def grant_grace(self) -> None:
        """Judge no one before one interval plus timeout from now (start, reconnect)."""
        self._not_before = self._clock.now() + self._grace
        self._deaf = False

    def database_failed(self) -> None:
        """The registry could not be reached (a heartbeat's write, a credential read, the
        sweep's own): what agents said may be going unwritten, so no one is judged until
        the database takes a sweep's write again, and from then every agent gets its full
        grace."""
        self._away = True

    def _listen(self) -> bool:
        """Whether the orchestrator can hear now. While a receiver cannot, silence proves
        nothing: judge no one; once it can again, every agent gets its full grace."""
        deaf = not self._hearing()
        if self._deaf and not deaf:
            self.grant_grace()
        self._deaf = deaf
        return not deaf

    def stale_seconds(self, interval_seconds: float) -> float | None:
        """Seconds since the last completed sweep when that is more than three intervals
        (the database refuses writes, or the orchestrator cannot hear): the registry's
        statuses are not being kept. None while sweeps complete."""
        behind = time.monotonic() - self.last_completed
        return behind if behind > 3 * interval_seconds else None

    async def sweep_once(self) -> list[str]:
        """One sweep; returns the ids marked offline. One that fails (the database is
        away) counts as `database_failed`."""
        try:
            return await self._sweep()
        except Exception:
            self._away = True
            raise

    async def _sweep(self) -> list[str]:
        if not self._listen():
            return await self._refresh_counts([])
        if self._away:  # back from a failed write: the grace runs from this sweep, whose
            self._away = False  # write fails (and is away again) while the database does
            self.grant_grace()
        now = self._clock.now()
        # In grace the sweep still writes, judging no one: a sweep completes only when the
        # registry takes its writes (`stale_seconds`), in grace or not.
        cutoff = now - self._timeout if now >= self._not_before else NO_ONE
        started = time.perf_counter()
        async with self._sessions.begin() as session:
            before = await registry.count_by_status(session)
            gone = await registry.mark_silent_offline(session, cutoff=cutoff, now=now)
            await registry.add_events(
                session,
                events=[
                    StatusEvent(agent_id, now, from_status="online", to_status="offline",
                                reason="timeout")
                    for agent_id in gone
                ],
            )  # fmt: skip
        self._metrics.sweep_seconds.observe(time.perf_counter() - started)
        self.last_completed = time.monotonic()
        self._report(gone=len(gone), online_before=before.get("online", 0))
        if gone:
            self._went_offline()  # their jobs are placed again now, not at the next pass
        return await self._refresh_counts([str(agent_id) for agent_id in gone])

    def _report(self, *, gone: int, online_before: int) -> None:
        fraction = gone / online_before if online_before else 0.0
        self._metrics.mass_offline.set(fraction)
        if gone:
            self._metrics.marked_offline.labels("timeout").inc(gone)
        if gone >= 2 and fraction > MASS_OFFLINE_FRACTION:
            log.warning(
                "%d of %d online agents went silent at once: likely a network event, "
                "not %d dead desktops",
                gone,
                online_before,
                gone,
            )
        elif gone:
            log.info("marked %d silent agent(s) offline", gone)

    async def _refresh_counts(self, gone: list[str]) -> list[str]:
        async with self._sessions() as session:
            counts = await registry.count_by_status(session)
        for status in ("online", "offline"):
            self._metrics.agents.labels(status).set(counts.get(status, 0))
        return gone

    async def run(self, interval_seconds: float) -> None:
        """Sweep forever on a monotonic schedule; a failed sweep is logged and retried."""
        await run_every(interval_seconds, self.sweep_once, "offline sweep")
