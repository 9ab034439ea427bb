"""What the RabbitMQ tests share: fixtures, a scratch topology on the shared broker, and
the waits they observe the broker and the registry with.

Every test declares its own exchange and queues (unique names) and deletes them after, so
other users of the shared broker are not disturbed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest
from sqlalchemy.exc import OperationalError
from yarl import URL

from chiffon.backoff import Backoff
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from chiffon.transport.auth import Credentials
from chiffon.transport.base import TransportError
from chiffon.transport.rabbitmq.consumer import RabbitConsumer
from chiffon.transport.rabbitmq.publisher import RabbitPublisher
from chiffon.transport.rabbitmq.topology import REJECT_REASON_HEADER, Topology
from tests import factories as f
from tests.auth import API_HEADERS, keyring
from tests.services import AMQP_URL, eventually, need

FAST = Backoff(initial_seconds=0.1, max_seconds=0.5)


@pytest.fixture
def amqp_url() -> str:
    url = URL(AMQP_URL)
    need("RabbitMQ", url.host or "127.0.0.1", url.port or 5672)
    return AMQP_URL


@asynccontextmanager
async def scratch_topology(url: str) -> AsyncIterator[Topology]:
    """Unique exchange and queue names on the shared broker, deleted afterwards, so other
    users of the broker are not disturbed."""
    prefix = f"chiffon-test-{uuid.uuid4().hex[:10]}"
    top = Topology(
        exchange=prefix,
        queue=f"{prefix}.agent-events",
        rejected_queue=f"{prefix}.rejected",
        max_length=1000,
        rejected_max_length=10,
    )
    try:
        yield top
    finally:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for queue in (top.queue, top.rejected_queue):
                await channel.queue_delete(queue)
            await channel.exchange_delete(top.exchange)


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    """Unique exchange and queue names for one test, deleted afterwards."""
    async with scratch_topology(amqp_url) as top:
        yield top


@asynccontextmanager
async def consuming(
    orch: Orchestrator, url: str, topology: Topology, **kwargs: Any
) -> AsyncIterator[RabbitConsumer]:
    consumer = RabbitConsumer(url, orch, topology=topology, backoff=FAST, **kwargs)
    await consumer.start()
    try:
        await consumer.wait_consuming(10)
        yield consumer
    finally:
        await consumer.stop()


@asynccontextmanager
async def publisher(
    url: str, topology: Topology, credentials: Credentials | None = None
) -> AsyncIterator[RabbitPublisher]:
    pub = RabbitPublisher(
        url, timeout_seconds=5, exchange=topology.exchange, credential=credentials
    )
    await pub.connect()
    try:
        yield pub
    finally:
        await pub.close()


async def ready_count(url: str, queue: str) -> int:
    """Messages waiting in `queue` (a passive declare; unacked ones are not counted)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def agent_row(orch: Orchestrator, agent_id: uuid.UUID) -> Any:
    async with orch.sessions() as s:
        return await registry.get_agent(s, agent_id=agent_id)


async def applied(orch: Orchestrator, agent_id: uuid.UUID) -> bool:
    return await agent_row(orch, agent_id) is not None


async def drain_a_backlog(orch: Orchestrator, url: str, topology: Topology, n: int) -> None:
    """Queue `n` heartbeats of `n` agents with no consumer, then consume them all."""
    messages = [f.message(name=f"desk-{i}") for i in range(n)]
    keys = await keyring(orch, [m.agent_id for m in messages])
    async with consuming(orch, url, topology) as consumer:
        await consumer.stop()  # declared the queue; now let a backlog build up
        async with publisher(url, topology, keys) as pub:
            await asyncio.gather(*(pub.publish(m) for m in messages))
        await consumer.start()
        await eventually(lambda: consumed(consumer, n))


async def consumed(consumer: RabbitConsumer, n: int) -> bool:
    return consumer.consumed >= n


class HoldingTarget:
    """The orchestrator as the consumer sees it, except that one agent's messages wait
    for the test to let them commit."""

    def __init__(self, orch: Orchestrator, *held: uuid.UUID) -> None:
        self._orch = orch
        self.metrics = orch.metrics
        self.held = set(held)
        self.gates: list[tuple[asyncio.Future[Any], Any]] = []

    def reject(self, reason: str) -> None:
        self._orch.reject(reason)

    async def admit(self, raw: bytes, proof: Any) -> Any:
        return await self._orch.admit(raw, proof)

    def receive(self, message: Any) -> asyncio.Future[Any]:
        if message.agent_id not in self.held:
            return self._orch.receive(message)
        gate: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.gates.append((gate, message))
        return gate


def unacked(queue: str) -> int:
    listed = rabbitmqctl("list_queues", "name", "messages_unacknowledged")
    return int(next(q["messages_unacknowledged"] for q in listed if q["name"] == queue))


async def gated(target: HoldingTarget, n: int) -> bool:
    return len(target.gates) >= n


def sample(orch: Orchestrator, name: str, **labels: str) -> float:
    value = orch.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def get_routed(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = time.monotonic() + 5
    while True:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            return message
        assert time.monotonic() < deadline, "nothing routed to the probe queue"
        await asyncio.sleep(0.05)


def rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "--formatter", "json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    parsed: list[dict[str, Any]] = json.loads(out)
    return parsed


def queue_arguments(queue: dict[str, Any]) -> dict[str, Any]:
    """rabbitmqctl's JSON lists arguments as [name, AMQP type, value] triples."""
    return {name: value for name, _type, value in queue["arguments"]}


async def counted(orch: Orchestrator, name: str, **labels: str) -> bool:
    return sample(orch, name, **labels) >= 1


async def has_ready(url: str, queue: str) -> bool:
    return await ready_count(url, queue) >= 1


async def drain_reasons(url: str, queue_name: str) -> list[tuple[bytes, Any]]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        got = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            got.append((message.body, message.headers.get(REJECT_REASON_HEADER)))
        return got


class FlakySessions:
    """The orchestrator's session factory, refusing to open while `down` is set."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.down = True

    def begin(self) -> Any:
        if self.down:
            raise OperationalError("BEGIN", {}, ConnectionRefusedError("database is down"))
        return self.real.begin()


async def requeued(orch: Orchestrator, n: int) -> bool:
    return sample(orch, "chiffon_amqp_requeued_total") >= n


async def total_consumed(one: RabbitConsumer, two: RabbitConsumer, n: int) -> bool:
    return one.consumed + two.consumed >= n


async def publish_until_accepted(pub: RabbitPublisher, msg: Any, *, within_seconds: float) -> None:
    """The agent loop's job, in short: retry the newest snapshot until confirmed."""
    deadline = time.monotonic() + within_seconds
    while True:
        try:
            await pub.publish(msg)
            return
        except TransportError:
            assert time.monotonic() < deadline, "the publisher never got through again"
            await asyncio.sleep(0.5)


async def consumer_count(url: str, queue: str, n: int) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:  # not declared again yet
            return False
        return declared.declaration_result.consumer_count == n


def wait_ready_consuming(api: str) -> None:
    deadline = time.monotonic() + 15
    while httpx.get(f"{api}/readyz").json()["checks"].get("amqp") != "hearing":
        assert time.monotonic() < deadline, "the orchestrator never subscribed"
        time.sleep(0.1)


def wait_agents(api: str, wanted: set[str]) -> None:
    deadline = time.monotonic() + 15

    def listed() -> set[str]:
        agents = httpx.get(f"{api}/api/v1/agents", headers=API_HEADERS).json()
        return {a["agent_id"] for a in agents}

    while not wanted <= listed():
        assert time.monotonic() < deadline, "published heartbeats never reached the registry"
        time.sleep(0.1)


async def publish_all(url: str, topology: Topology, msgs: list[Any], keys: Credentials) -> None:
    async with publisher(url, topology, keys) as pub:
        for msg in msgs:
            await pub.publish(msg)


def moves(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The consumer's state moves logged while `caplog` listened at DEBUG ("a -> b")."""
    prefix = "AMQP consumer: "
    return [
        r.getMessage().removeprefix(prefix)
        for r in caplog.records
        if r.name == "chiffon.transport.rabbitmq.consumer"
        and r.getMessage().startswith(prefix)
        and " -> " in r.getMessage()
    ]
