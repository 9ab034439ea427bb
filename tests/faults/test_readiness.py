"""9. Readiness means "can consume and can write": a registry that cannot be written (a full
disk) or a paused consumer is not ready, and the API and dashboard say the registry is
stale. Before, `/readyz` said 200 "ready" while agents past their timeout stayed "online".

The full disk is PostgreSQL's own refusal: a statement trigger on `agent_registry` raising
SQLSTATE 53100 (`disk_full`) for every write, as PostgreSQL does when it cannot extend a
file. The system's PostgreSQL is never stopped or filled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest

from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.transport.rabbitmq.consumer import RabbitConsumer
from tests import factories as f
from tests.auth import API_HEADERS, bearer, issue
from tests.conftest import api_client
from tests.procs import free_port


@pytest.fixture
def disk_full(postgres_url: str) -> Iterator[psycopg.Connection]:
    """A switch: `set(True)` makes every write to agent_registry fail as on a full disk."""
    conn = psycopg.connect(postgres_url, autocommit=True)
    conn.execute(
        "CREATE OR REPLACE FUNCTION chiffon_test_disk_full() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'could not extend file: No space left on device' "
        "USING ERRCODE = '53100'; END $$ LANGUAGE plpgsql"
    )
    try:
        yield conn
    finally:
        conn.execute("DROP TRIGGER IF EXISTS chiffon_test_disk_full ON agent_registry")
        conn.execute("DROP FUNCTION chiffon_test_disk_full()")
        conn.close()


async def _fill(conn: psycopg.Connection, full: bool) -> None:
    """Create or drop the trigger off the event loop: the orchestrator under test shares
    the loop, and a transaction of its (a dispatcher's read) that holds a lock on the
    table must be able to finish while the DDL waits for it (in the loop, they waited for
    each other: the test hung for its whole timeout under load)."""
    await asyncio.to_thread(_ddl, conn, full)


def _ddl(conn: psycopg.Connection, full: bool) -> None:
    if full:
        conn.execute(
            "CREATE TRIGGER chiffon_test_disk_full BEFORE INSERT OR UPDATE ON agent_registry "
            "FOR EACH STATEMENT EXECUTE FUNCTION chiffon_test_disk_full()"
        )
    else:
        conn.execute("DROP TRIGGER chiffon_test_disk_full ON agent_registry")


@pytest.fixture
async def sweeping(settings: OrchestratorSettings) -> AsyncIterator[Orchestrator]:
    """An orchestrator that sweeps every 0.2 s on the real clock (timeout 1 s)."""
    fast = {
        "heartbeat_interval_seconds": 0.5,
        "heartbeat_timeout_seconds": 1,
        "sweep_interval_seconds": 0.2,
    }
    orch = Orchestrator(settings.model_copy(update=fast))
    await orch.start()
    yield orch
    await orch.stop()


async def _ready(api: httpx.AsyncClient, want: int, within: float = 5) -> httpx.Response:
    deadline = time.monotonic() + within
    while (resp := await api.get("/readyz")).status_code != want:
        assert time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.1)
    return resp


async def test_9_a_registry_that_cannot_be_written_is_not_ready_and_says_it_is_stale(
    sweeping: Orchestrator, disk_full: psycopg.Connection
) -> None:
    async with api_client(sweeping, API_HEADERS) as api:
        agent = uuid.uuid4()
        auth = bearer(await issue(sweeping, agent))
        url = f"/api/v1/agents/{agent}/heartbeat"
        assert (
            await api.post(url, content=f.raw(f.message(agent)), headers=auth)
        ).status_code == 200
        ready = await _ready(api, 200, within=3)
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "ingest": "ok", "sweep": "ok"},
        }
        summary = (await api.get("/api/v1/fleet/summary")).json()
        assert summary["registry_stale_seconds"] is None

        await _fill(disk_full, True)
        refused = await api.post(url, content=f.raw(f.message(agent)), headers=auth)
        assert refused.status_code == 503  # not durable: the agent keeps it and retries
        await _ready(api, 503)
        deadline = time.monotonic() + 5
        while (checks := (await api.get("/readyz")).json()["checks"])["sweep"] == "ok":
            assert time.monotonic() < deadline, checks
            await asyncio.sleep(0.1)
        assert checks["database"] == "ok"  # it answers reads: only writing is broken
        assert checks["ingest"] == "the last write failed"
        assert checks["sweep"].startswith("no completed sweep for")
        summary = (await api.get("/api/v1/fleet/summary")).json()
        assert summary["registry_stale_seconds"] > 0.6

        await _fill(disk_full, False)
        back = await api.post(url, content=f.raw(f.message(agent)), headers=auth)
        assert back.status_code == 200
        await _ready(api, 200)


async def test_9_a_receiver_that_cannot_hear_makes_the_orchestrator_not_ready(
    sweeping: Orchestrator,
) -> None:
    """A RabbitMQ receiver whose broker does not answer: `/readyz` lists it, not hearing."""
    consumer = RabbitConsumer(f"amqp://guest:guest@127.0.0.1:{free_port()}/", sweeping)
    sweeping.add_receiver(consumer)
    await consumer.start()
    try:
        async with api_client(sweeping) as api:
            deaf = await _ready(api, 503)
            assert deaf.json()["checks"]["amqp"] == "not hearing"
    finally:
        await consumer.stop()
