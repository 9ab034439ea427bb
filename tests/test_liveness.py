"""Offline detection with a controllable clock: no 45-second sleeps."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.liveness import Sweeper
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from tests import factories as f


async def _status(orchestrator: Orchestrator, agent: uuid.UUID) -> str:
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent)
    assert row is not None
    return row.status


async def test_killed_agent_is_offline_within_timeout_plus_sweep(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    clock.advance(60)  # past the start-up grace
    await orchestrator.receive(f.message(agent))  # its last beat, then it is killed
    # Sweeps every 5 s: silent for 45 s is still online, the first sweep after that marks it.
    for _ in range(9):
        clock.advance(5)
        assert await orchestrator.sweeper.sweep_once() == []
    assert await _status(orchestrator, agent) == "online"
    clock.advance(5)  # 50 s after the last beat: timeout (45) + one sweep interval (5)
    assert await orchestrator.sweeper.sweep_once() == [str(agent)]
    assert await _status(orchestrator, agent) == "offline"
    async with orchestrator.sessions() as s:
        last = (await registry.list_events(s, agent_id=agent))[0]
    assert (last.from_status, last.to_status, last.reason) == ("online", "offline", "timeout")


async def test_beating_agent_is_never_marked_offline(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    for seq in range(1, 20):
        clock.advance(15)
        await orchestrator.receive(f.message(agent, seq=seq))
        assert await orchestrator.sweeper.sweep_once() == []
    assert await _status(orchestrator, agent) == "online"


async def test_orchestrator_restart_gives_every_agent_one_full_timeout(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agents = [uuid.uuid4() for _ in range(3)]
    for agent in agents:
        await orchestrator.receive(f.message(agent))
    clock.advance(600)  # the orchestrator was down for 10 minutes
    fresh = Sweeper(
        orchestrator.sessions, clock, orchestrator.metrics, timeout_seconds=45
    )  # a new process starts
    clock.advance(40)
    assert await fresh.sweep_once() == []
    await orchestrator.receive(f.message(agents[0]))  # two of them beat in the grace period
    await orchestrator.receive(f.message(agents[1]))
    clock.advance(10)
    assert await fresh.sweep_once() == [str(agents[2])]  # only the truly silent one goes


async def test_a_deaf_orchestrator_judges_no_one(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    hears = False  # what the orchestrator's receivers say, asked at every sweep
    sweeper = Sweeper(
        orchestrator.sessions, clock, orchestrator.metrics, timeout_seconds=45,
        hearing=lambda: hears,
    )  # fmt: skip
    clock.advance(60)
    await orchestrator.receive(f.message(agent))
    clock.advance(300)  # e.g. the broker connection is down all this time
    assert await sweeper.sweep_once() == []
    hears = True  # reconnected: one more full timeout of grace from this sweep
    assert await sweeper.sweep_once() == []
    clock.advance(44)
    assert await sweeper.sweep_once() == []
    clock.advance(2)
    assert await sweeper.sweep_once() == [str(agent)]


async def test_concurrent_sweeps_mark_each_agent_once(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    clock.advance(60)
    agents = [uuid.uuid4() for _ in range(20)]
    await asyncio.gather(*(orchestrator.receive(f.message(a)) for a in agents))
    clock.advance(50)
    replicas = [
        Sweeper(orchestrator.sessions, clock, orchestrator.metrics, timeout_seconds=45)
        for _ in range(3)
    ]
    clock.advance(50)  # past each replica's own grace
    results = await asyncio.gather(*(r.sweep_once() for r in replicas))
    marked = [agent for result in results for agent in result]
    assert sorted(marked) == sorted(str(a) for a in agents)
    async with orchestrator.sessions() as s:
        events = await registry.list_events(s, limit=1000)
    assert sum(e.reason == "timeout" for e in events) == 20


async def test_most_of_the_fleet_going_silent_is_logged_as_a_network_event(
    orchestrator: Orchestrator, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    clock.advance(60)
    agents = [uuid.uuid4() for _ in range(10)]
    await asyncio.gather(*(orchestrator.receive(f.message(a)) for a in agents))
    clock.advance(30)
    for a in agents[:3]:
        await orchestrator.receive(f.message(a))
    clock.advance(20)
    with caplog.at_level(logging.WARNING):
        gone = await orchestrator.sweeper.sweep_once()
    assert len(gone) == 7  # they are really silent, so they are marked
    assert "7 of 10 online agents went silent at once" in caplog.text
    assert orchestrator.metrics.mass_offline._value.get() == pytest.approx(0.7)
