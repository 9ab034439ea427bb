"""12. The registry database away past the heartbeat timeout (issue 34, item 6).

Before, the first sweep after PostgreSQL came back judged every agent by a last beat
written before the outage: a healthy desktop was marked offline before its queued
heartbeat was written, both its jobs ended `lost` (one had succeeded meanwhile), and its
agent, told `stale`, killed the healthy other. Now a registry the orchestrator could not
reach (a failed sweep, heartbeat write or credential read) holds the sweep until the
database takes the sweep's write again, and from then every agent gets a full heartbeat
interval plus its timeout before anyone is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chiffon.orchestrator.batcher import IngestUnavailableError
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.liveness import Sweeper
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import registry
from chiffon.persistence.models import JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from tests import factories as f
from tests.conftest import fresh_postgres_database
from tests.jobfleet import desktop
from tests.private_services import PrivatePostgres
from tests.services import eventually

INTERVAL, TIMEOUT = 15.0, 45.0  # the `settings` fixture's, for the manual-clock tests
GRACE = INTERVAL + TIMEOUT


class Unreachable:
    """A session factory for the sweep that fails like a stopped database while `down`."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection to 127.0.0.1:5432 refused")

    def __call__(self) -> Any:
        self._check()
        return self._sessions()

    def begin(self) -> Any:
        self._check()
        return self._sessions.begin()


async def _status(orch: Orchestrator, agent: uuid.UUID) -> str:
    async with orch.sessions() as session:
        row = await registry.get_agent(session, agent_id=agent)
    assert row is not None
    return row.status


async def beats_through_the_grace(
    orch: Orchestrator, clock: ManualClock, sweeper: Sweeper, live: uuid.UUID
) -> None:
    """From a sweep that began the grace to 1 s before its end: the live agent's queued
    beat is written a little under an interval later, then one beat every interval; the
    sweep judges no one, though the dead agent is long past its timeout."""
    clock.advance(INTERVAL - 1)
    for beat in range(4):  # 14, 29, 44 and 59 s into the grace
        clock.advance(INTERVAL if beat else 0)
        await orch.receive(f.message(live))
        assert await sweeper.sweep_once() == []


async def test_after_failed_sweeps_no_one_is_judged_before_interval_plus_timeout_of_hearing(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    database = Unreachable(orchestrator.sessions)
    sweeper = Sweeper(database, clock, orchestrator.metrics,  # type: ignore[arg-type]
                      timeout_seconds=TIMEOUT, interval_seconds=INTERVAL)  # fmt: skip
    live, dead = uuid.uuid4(), uuid.uuid4()
    clock.advance(GRACE)  # past the start-up grace
    for agent in (live, dead):
        await orchestrator.receive(f.message(agent))
    clock.advance(10)
    database.down = True  # 90 s away: every sweep fails, and so do the agents' beats
    for _ in range(18):
        clock.advance(5)
        with pytest.raises(ConnectionRefusedError):
            await sweeper.sweep_once()
    database.down = False
    # Back: both last beats are 100 s old, yet the live agent's queued beat is unwritten.
    assert await sweeper.sweep_once() == []
    await beats_through_the_grace(orchestrator, clock, sweeper, live)
    clock.advance(1.5)  # past interval + timeout: the silent one is judged, the live one not
    assert await sweeper.sweep_once() == [str(dead)]
    assert await _status(orchestrator, live) == "online"


async def test_a_sweep_that_fails_again_restarts_the_grace_from_the_next_that_writes(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    database = Unreachable(orchestrator.sessions)
    sweeper = Sweeper(database, clock, orchestrator.metrics,  # type: ignore[arg-type]
                      timeout_seconds=TIMEOUT, interval_seconds=INTERVAL)  # fmt: skip
    agent = uuid.uuid4()
    clock.advance(GRACE)
    await orchestrator.receive(f.message(agent))
    clock.advance(TIMEOUT + 10)
    database.down = True
    with pytest.raises(ConnectionRefusedError):
        await sweeper.sweep_once()
    database.down = False
    assert await sweeper.sweep_once() == []  # grace from here
    clock.advance(GRACE - 5)
    database.down = True  # a second blip inside the grace
    with pytest.raises(ConnectionRefusedError):
        await sweeper.sweep_once()
    database.down = False
    clock.advance(10)  # past the first grace, inside the one the second blip began
    assert await sweeper.sweep_once() == []
    clock.advance(GRACE)
    assert await sweeper.sweep_once() == [str(agent)]


async def test_a_failed_heartbeat_write_holds_the_sweep_for_a_full_grace(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep itself never failed: only ingest could not write (a blip between sweeps)."""
    live, dead = uuid.uuid4(), uuid.uuid4()
    clock.advance(GRACE)
    for agent in (live, dead):
        await orchestrator.receive(f.message(agent))
    clock.advance(TIMEOUT - 1)

    async def unavailable(*_: object) -> None:
        raise ConnectionRefusedError("connection to 127.0.0.1:5432 refused")

    with monkeypatch.context() as patch:
        patch.setattr("chiffon.orchestrator.batcher.apply_batch", unavailable)
        with pytest.raises(IngestUnavailableError):
            await orchestrator.receive(f.message(live))  # its beat could not be written
    clock.advance(2)  # both last writes are now past the timeout
    assert await orchestrator.sweeper.sweep_once() == []
    await beats_through_the_grace(orchestrator, clock, orchestrator.sweeper, live)
    clock.advance(1.5)
    assert await orchestrator.sweeper.sweep_once() == [str(dead)]
    assert await _status(orchestrator, live) == "online"


# ------------------------------------------------------- the real outage, on a real clock

FAST = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 1.5,
        "sweep_interval_seconds": 0.2}  # fmt: skip
FAST_GRACE = 2.0  # interval + timeout


@pytest.fixture
def outage_database(private_postgres: PrivatePostgres) -> Iterator[str]:
    """On the test run's own PostgreSQL cluster: the system's is never stopped."""
    with fresh_postgres_database(private_postgres.admin_url) as url:
        yield url


@pytest.fixture
async def sweeping(
    settings: OrchestratorSettings, outage_database: str
) -> AsyncIterator[Orchestrator]:
    """An orchestrator that sweeps and places on the real clock, on the private cluster."""
    orch = Orchestrator(settings.model_copy(update={"database_url": outage_database, **FAST}))
    await orch.start()
    yield orch
    await orch.stop()


class Desktop:
    """A healthy agent beating every interval; its beats fail while the registry is away,
    and `hold` keeps the next one queued (an agent backing off to send it again)."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.agent = uuid.uuid4()
        self.hold = False
        self.failed = 0
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            if not self.hold:
                try:
                    await desktop(self.orch, "healthy", (24.0, 24.0), (24.0, 24.0),
                                  agent=self.agent)  # fmt: skip
                except Exception:  # the registry is away: the agent tries again
                    self.failed += 1
            await asyncio.sleep(FAST["heartbeat_interval_seconds"])

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _job(orch: Orchestrator, job_id: uuid.UUID) -> JobRow:
    async with orch.sessions() as session:
        job = await session.get(JobRow, job_id)
    assert job is not None
    return job


async def _timeouts(orch: Orchestrator, agent: uuid.UUID) -> list[datetime]:
    async with orch.sessions() as session:
        events = await registry.list_events(session, agent_id=agent)
    return [e.at for e in events if (e.to_status, e.reason) == ("offline", "timeout")]


@pytest.mark.db_restart
async def test_12_database_down_past_the_timeout_loses_no_agent_and_no_job(
    sweeping: Orchestrator, private_postgres: PrivatePostgres
) -> None:
    orch = sweeping
    healthy = Desktop(orch)
    dead = await desktop(orch, "dies-in-the-outage", (24.0, 24.0), accepts=False)
    try:
        spec = JobSubmit.model_validate(
            {"command": ["python", "train.py"], "requirements": {"gpus": 1, "vram_gb": 8}}
        )
        jobs = [(await orch.submit_job(spec))[0] for _ in range(2)]

        async def both_placed() -> bool:
            return [(await _job(orch, j)).state for j in jobs] == ["assigned"] * 2

        await eventually(both_placed, within_seconds=15)
        for job_id in jobs:
            assert await orch.report_attempt(healthy.agent, job_id, 1, Report("started")) == (
                "applied"
            )
        await desktop(orch, "dies-in-the-outage", (24.0, 24.0), accepts=False, agent=dead)
        with private_postgres.stopped():
            failed_before = healthy.failed
            succeeded = Report("ended", "exit", exit_code=0)
            with pytest.raises(Exception):  # noqa: B017 - the job succeeds; its report fails
                await orch.report_attempt(healthy.agent, jobs[0], 1, succeeded)
            await asyncio.sleep(2 * FAST["heartbeat_timeout_seconds"])
            assert healthy.failed > failed_before  # it kept beating, and no beat was written
            healthy.hold = True  # the beat it has queued waits for its backoff
        back_at, back = datetime.now(UTC), time.monotonic()

        async def swept_since_back() -> bool:
            return orch.sweeper.last_completed > back

        await eventually(swept_since_back, within_seconds=10)
        await asyncio.sleep(3 * FAST["sweep_interval_seconds"])  # a few sweeps more
        healthy.hold = False  # its queued beat is written now, inside the grace
        assert await orch.report_attempt(healthy.agent, jobs[0], 1, succeeded) == "applied"
        assert await orch.report_attempt(healthy.agent, jobs[1], 1, Report("alive")) == "applied"
        assert [(await _job(orch, j)).state for j in jobs] == ["succeeded", "running"]

        async def dead_offline() -> bool:
            return await _status(orch, dead) == "offline"

        await eventually(dead_offline, within_seconds=FAST_GRACE + 5)  # the grace ends
        (offline_at,) = await _timeouts(orch, dead)
        grace = (offline_at - back_at).total_seconds()
        assert grace >= FAST_GRACE - 0.5, f"judged {grace:.2f} s after the database came back"
        assert await _status(orch, healthy.agent) == "online"
        assert await _timeouts(orch, healthy.agent) == []
        assert (await _job(orch, jobs[1])).state == "running"
    finally:
        await healthy.stop()
