"""An agent's order long-poll asks the database nothing while it waits (the class of issue
34, item 9: every agent polling over HTTP asked once a second through the shared pool). It
is woken by this orchestrator's placements and, on PostgreSQL, by any orchestrator's, through
the database's notice (migration 0016)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.delivery import OrderPost
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.schemas.jobs import JobSubmit
from chiffon.transport.memory import InMemoryOrderPush
from tests.auth import issue
from tests.jobfleet import desktop
from tests.services import eventually
from tests.test_log_followers import job_queries


async def submit(orch: Orchestrator, clock: ManualClock) -> uuid.UUID:
    spec = JobSubmit.model_validate({"command": ["true"]})
    return await jobs.submit(orch.sessions, spec, now=clock.now())


async def polling_agent(orch: Orchestrator) -> tuple[uuid.UUID, asyncio.Task[list[object]]]:
    agent = await desktop(orch, "a", (24.0, 24.0))
    await issue(orch, agent)
    poll = asyncio.create_task(orch.wait_orders(agent, wait_seconds=20))
    return agent, poll  # type: ignore[return-value]


async def test_a_placement_here_answers_a_waiting_poll_at_once(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    _, poll = await polling_agent(orchestrator)
    await asyncio.sleep(0.3)
    assert not poll.done()
    await submit(orchestrator, clock)
    placed = time.monotonic()
    await orchestrator.dispatcher.tick()
    assert len(await asyncio.wait_for(poll, 5)) == 1
    assert time.monotonic() - placed < 0.5


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_waiting_poll_asks_nothing_and_another_orchestrators_placement_wakes_it(
    orchestrator: Orchestrator, settings: OrchestratorSettings, clock: ManualClock
) -> None:
    other = Orchestrator(settings, clock=clock)
    await other.start(sweep=False)
    try:

        async def listening() -> bool:
            return orchestrator.orders.notices and other.orders.notices

        await eventually(listening)
        with job_queries() as seen:
            _, poll = await polling_agent(orchestrator)
            await asyncio.sleep(0.3)
            seen.clear()
            await asyncio.sleep(1.5)  # a poll asking again each second is caught
            assert not poll.done()
            assert seen == [], f"{len(seen)} queries while waiting, the first: {seen[:1]}"
            await submit(other, clock)
            placed = time.monotonic()
            await other.dispatcher.tick()
            assert len(await asyncio.wait_for(poll, 5)) == 1
            assert time.monotonic() - placed < 2
    finally:
        await other.stop()


async def test_a_placement_is_pushed_to_its_agent_once_however_often_it_is_told_meanwhile(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """Over a push transport (RabbitMQ's, here its in-memory twin) the agent is sent what
    it must be told: one push for a burst of placements there, saying all that is due."""
    push = InMemoryOrderPush()
    post = OrderPost(orchestrator.sessions, clock, orchestrator.credentials.order_key,
                     long_poll_max_seconds=30, push=push)  # fmt: skip
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    await issue(orchestrator, agent)
    await submit(orchestrator, clock)
    await orchestrator.dispatcher.tick()
    for _ in range(5):
        post.tell(agent)

    async def pushed() -> bool:
        return bool(push.sent)

    await eventually(pushed)
    await asyncio.sleep(0.2)  # any second push would have gone by now
    assert list(push.sent) == [agent] and len(push.sent[agent]) == 1
    await post.stop()
    assert push.closed
    post.tell(agent)  # stopped: nothing more is pushed
    await asyncio.sleep(0.1)
    assert len(push.sent[agent]) == 1
