"""4. PostgreSQL stopped and started under a running orchestrator (HTTP and RabbitMQ)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.rabbitmq.topology import Topology
from tests import factories as f
from tests.auth import API_HEADERS, bearer, issue, keyring
from tests.conftest import fresh_postgres_database
from tests.private_services import PrivatePostgres
from tests.rabbitmq.helpers import applied, consuming, publisher, ready_count, requeued
from tests.services import eventually

pytestmark = pytest.mark.db_restart


@pytest.fixture
def database_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    """On the test run's own PostgreSQL cluster: the system's is never stopped."""
    with fresh_postgres_database(private_postgres.admin_url) as url:
        yield url


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(orchestrator, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://chiffon", headers=API_HEADERS
    ) as client:
        yield client


async def _until_ok(send: object, within_seconds: float = 30) -> httpx.Response:
    deadline = time.monotonic() + within_seconds
    while True:
        resp: httpx.Response = await send()  # type: ignore[operator]
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        await asyncio.sleep(0.3)


async def test_4_database_down_means_503_no_early_ack_and_ingest_resumes_by_itself(
    orchestrator: Orchestrator,
    api: httpx.AsyncClient,
    clock: ManualClock,
    amqp_url: str,
    topology: Topology,
    private_postgres: PrivatePostgres,
) -> None:
    agent = f.message().agent_id
    auth = bearer(await issue(orchestrator, agent))
    queued = f.message(name="queued-during-outage")
    keys = await keyring(orchestrator, [queued.agent_id])

    def beat(seq: int) -> bytes:
        return f.raw(f.message(agent, seq=seq, sent_at=clock.now()))

    url = f"/api/v1/agents/{agent}/heartbeat"
    assert (await api.post(url, content=beat(1), headers=auth)).status_code == 200
    async with consuming(orchestrator, amqp_url, topology):
        with private_postgres.stopped():
            read = await api.get("/api/v1/agents")
            assert read.status_code == 503, read.text
            assert (await api.get("/readyz")).status_code == 503
            ingest = await api.post(url, content=beat(2), headers=auth)
            assert ingest.status_code == 503, ingest.text  # not acked: its batch never committed
            async with publisher(amqp_url, topology, keys) as pub:
                await pub.publish(queued)  # the broker holds it until the registry is back
            # the consumer took it, could not write it, and handed it back to the broker
            await eventually(lambda: requeued(orchestrator, 1))
            assert not await _registered(api, queued.agent_id, during_outage=True)
        resumed = await _until_ok(lambda: api.post(url, content=beat(3), headers=auth))
        assert resumed.status_code == 200 and resumed.json()["outcome"] == "applied"
        # the message the broker held is applied once the consumer's backoff ends
        await eventually(lambda: applied(orchestrator, queued.agent_id), within_seconds=30)
    assert (await api.get(f"/api/v1/agents/{agent}")).json()["status"] == "online"
    assert await ready_count(amqp_url, topology.queue) == 0


async def _registered(api: httpx.AsyncClient, agent_id: object, *, during_outage: bool) -> bool:
    resp = await api.get(f"/api/v1/agents/{agent_id}")
    assert resp.status_code != 500
    return resp.status_code == 200
