"""The RabbitMQ transport against a real broker, on both registry engines.

Every test declares its own exchange and queues (unique names) and deletes them after, so
other users of the shared broker are not disturbed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import httpx
import pytest
from sqlalchemy.exc import OperationalError
from yarl import URL

from chiffon.backoff import Backoff
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from chiffon.transport.auth import Credentials
from chiffon.transport.base import TransportError
from chiffon.transport.rabbitmq.consumer import RabbitConsumer
from chiffon.transport.rabbitmq.publisher import RabbitPublisher
from chiffon.transport.rabbitmq.topology import REJECT_REASON_HEADER, Topology
from tests import factories as f
from tests.auth import API_HEADERS, TOKENS_ENV, enroll, keyring
from tests.private_services import PrivateRabbit
from tests.procs import CHIFFON, free_port, run_cli, stop, wait_http
from tests.services import AMQP_URL, eventually, need

FAST = Backoff(initial_seconds=0.1, max_seconds=0.5)


@pytest.fixture
def clock() -> ManualClock:
    """Real time to start with: signed messages must be inside the replay window."""
    return ManualClock(datetime.now(UTC))


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


async def test_heartbeat_round_trip_is_applied_then_acked(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    msg = f.message(name="render-07", res=f.resources(gpus_free_total=[(20.0, 24.0)]))
    keys = await keyring(orchestrator, [msg.agent_id])
    async with consuming(orchestrator, amqp_url, topology) as consumer:
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(msg)  # returns after the broker's confirm
        await eventually(lambda: _applied(orchestrator, msg.agent_id))
    row = await agent_row(orchestrator, msg.agent_id)
    assert (row.status, row.name, row.gpu_vram_available_gb) == ("online", "render-07", 20.0)
    assert consumer.consumed == 1
    # After the consumer is gone an unacked message would be ready again: none is.
    assert await ready_count(amqp_url, topology.queue) == 0


async def _applied(orch: Orchestrator, agent_id: uuid.UUID) -> bool:
    return await agent_row(orch, agent_id) is not None


async def test_backlog_is_applied_in_batches_not_one_transaction_per_message(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    await _drain_a_backlog(orchestrator, amqp_url, topology, 200)
    batches = _sample(orchestrator, "chiffon_ingest_batch_size_count")
    assert batches < 50, f"{batches} transactions for 200 messages: not batched"
    assert await ready_count(amqp_url, topology.queue) == 0


async def _drain_a_backlog(orch: Orchestrator, url: str, topology: Topology, n: int) -> None:
    """Queue `n` heartbeats of `n` agents with no consumer, then consume them all."""
    messages = [f.message(name=f"desk-{i}") for i in range(n)]
    keys = await keyring(orch, [m.agent_id for m in messages])
    async with consuming(orch, url, topology) as consumer:
        await consumer.stop()  # declared the queue; now let a backlog build up
        async with publisher(url, topology, keys) as pub:
            await asyncio.gather(*(pub.publish(m) for m in messages))
        await consumer.start()
        await eventually(lambda: _consumed(consumer, n))


async def _consumed(consumer: RabbitConsumer, n: int) -> bool:
    return consumer.consumed >= n


async def test_the_acks_of_a_batch_travel_as_one_frame(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology, monkeypatch: Any
) -> None:
    acks: list[tuple[int, bool]] = []
    real_ack = aiormq.Channel.basic_ack

    async def counted(channel: Any, delivery_tag: int, multiple: bool = False, **kw: Any) -> None:
        acks.append((delivery_tag, multiple))
        await real_ack(channel, delivery_tag, multiple, **kw)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    await _drain_a_backlog(orchestrator, amqp_url, topology, 300)
    assert await ready_count(amqp_url, topology.queue) == 0  # every one acked
    batches = _sample(orchestrator, "chiffon_ingest_batch_size_count")
    assert all(multiple for _, multiple in acks)
    assert len(acks) <= batches + 1, f"{len(acks)} ack frames for {batches} commits"
    assert max(tag for tag, _ in acks) == 300


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


def _unacked(queue: str) -> int:
    listed = _rabbitmqctl("list_queues", "name", "messages_unacknowledged")
    return int(next(q["messages_unacknowledged"] for q in listed if q["name"] == queue))


async def test_a_message_not_yet_committed_is_never_covered_by_a_later_ack(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    first, held = f.message(name="first"), f.message(name="held")
    later = [f.message(name=f"later-{i}") for i in range(50)]
    keys = await keyring(orchestrator, [m.agent_id for m in [first, held, *later]])
    target = HoldingTarget(orchestrator, held.agent_id)
    consumer = RabbitConsumer(amqp_url, target, topology=topology, backoff=FAST)  # type: ignore[arg-type]
    await consumer.start()
    try:
        await consumer.wait_consuming(10)
        async with publisher(amqp_url, topology, keys) as pub:
            for message in [first, held, *later]:  # delivery tags in this order
                await pub.publish(message)
        await eventually(lambda: _consumed(consumer, 51))
        await asyncio.sleep(0.2)  # time for any ack to go out
        # `first` is acked; the held message is not, nor (held back) the 50 after it.
        assert await asyncio.to_thread(_unacked, topology.queue) == 51
        assert await agent_row(orchestrator, held.agent_id) is None

        ((gate, message),) = target.gates
        gate.set_result(await orchestrator.receive(message))  # now it commits
        await eventually(lambda: _consumed(consumer, 52))
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(_unacked, topology.queue) == 0
    finally:
        await consumer.stop()
    assert await ready_count(amqp_url, topology.queue) == 0
    assert (await agent_row(orchestrator, held.agent_id)).status == "online"


async def test_a_failed_write_in_the_middle_is_redelivered_and_the_rest_acked_once(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    held = f.message(name="held")
    around = [f.message(name=f"desk-{i}") for i in range(20)]
    keys = await keyring(orchestrator, [m.agent_id for m in [held, *around]])
    target = HoldingTarget(orchestrator, held.agent_id)
    consumer = RabbitConsumer(amqp_url, target, topology=topology, backoff=FAST)  # type: ignore[arg-type]
    await consumer.start()
    try:
        await consumer.wait_consuming(10)
        async with publisher(amqp_url, topology, keys) as pub:
            for message in [*around[:10], held, *around[10:]]:
                await pub.publish(message)
        await eventually(lambda: _consumed(consumer, 20))
        ((gate, _message),) = target.gates
        gate.set_exception(RuntimeError("the database went away"))  # nacked, requeued
        await eventually(lambda: _gated(target, 2))  # the broker handed it out again
        gate, message = target.gates[1]
        gate.set_result(await orchestrator.receive(message))
        await eventually(lambda: _consumed(consumer, 21))
    finally:
        await consumer.stop()
    assert await ready_count(amqp_url, topology.queue) == 0
    assert _sample(orchestrator, "chiffon_amqp_requeued_total") == 1
    handled = {
        outcome: _sample(
            orchestrator, "chiffon_messages_accepted_total", kind="heartbeat", outcome=outcome
        )
        for outcome in ("applied", "stale")
    }
    assert handled == {"applied": 21, "stale": 0}  # each once: no ack lost, none redelivered


async def test_a_write_in_hand_when_the_consumer_resumes_is_acked_not_redelivered(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    """Resuming after a failed write moves to a fresh channel; a delivery still being
    written on the old one commits and is acked there before the old channel closes."""
    slow, failing = f.message(name="slow"), f.message(name="failing")
    keys = await keyring(orchestrator, [slow.agent_id, failing.agent_id])
    target = HoldingTarget(orchestrator, slow.agent_id, failing.agent_id)
    consumer = RabbitConsumer(amqp_url, target, topology=topology, backoff=FAST)  # type: ignore[arg-type]
    await consumer.start()
    try:
        await consumer.wait_consuming(10)
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(slow)
            await pub.publish(failing)
        await eventually(lambda: _gated(target, 2))
        (slow_gate, _), (failing_gate, _) = target.gates
        failing_gate.set_exception(RuntimeError("the database went away"))  # pause, resume
        await eventually(lambda: _gated(target, 3))  # redelivered on the fresh channel
        await asyncio.sleep(0.3)  # a resume that did not wait would have closed the old one
        slow_gate.set_result(await orchestrator.receive(slow))  # commits while resuming
        gate, message = target.gates[2]
        assert message.agent_id == failing.agent_id
        gate.set_result(await orchestrator.receive(message))
        await eventually(lambda: _consumed(consumer, 2))
    finally:
        await consumer.stop(drain_timeout_seconds=2)
    assert await ready_count(amqp_url, topology.queue) == 0
    assert [m.agent_id for _, m in target.gates].count(slow.agent_id) == 1  # never again


async def _gated(target: HoldingTarget, n: int) -> bool:
    return len(target.gates) >= n


def _sample(orch: Orchestrator, name: str, **labels: str) -> float:
    value = orch.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_routing_keys_name_the_kind_and_the_agent(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    agent = uuid.uuid4()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        probe = await channel.declare_queue(exclusive=True)
        await probe.bind(exchange, "agent.*.*")
        async with publisher(amqp_url, topology) as pub:
            await pub.publish(f.message(agent, seq=1))
            await pub.publish(f.message(agent, seq=2, kind="offline"))
        got = [await _get(probe) for _ in range(2)]
    assert [m.routing_key for m in got] == [f"agent.heartbeat.{agent}", f"agent.offline.{agent}"]
    assert {m.content_type for m in got} == {"application/json"}
    assert json.loads(got[1].body)["kind"] == "offline"


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = time.monotonic() + 5
    while True:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            return message
        assert time.monotonic() < deadline, "nothing routed to the probe queue"
        await asyncio.sleep(0.05)


async def test_queues_carry_the_documented_arguments(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    async with consuming(orchestrator, amqp_url, topology, prefetch=300):
        listed = _rabbitmqctl("list_queues", "name", "durable", "arguments", "consumers")
    queues = {q["name"]: q for q in listed}
    events, rejected = queues[topology.queue], queues[topology.rejected_queue]
    assert events["durable"] and rejected["durable"]
    # no x-message-ttl: a changed heartbeat timeout must never meet a queue declared with
    # another (each agent sets its messages' expiration instead)
    assert _args(events) == {"x-max-length": 1000, "x-overflow": "drop-head"}
    assert "x-dead-letter-exchange" not in _args(events)
    assert _args(rejected) == {
        "x-max-length": 10,
        "x-max-length-bytes": 64 * 1024 * 1024,
        "x-overflow": "drop-head",
    }
    assert events["consumers"] == 1


async def test_a_queue_declared_with_other_arguments_is_consumed_as_it_is(
    orchestrator: Orchestrator,
    amqp_url: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An earlier start (or version) declared the queues with another TTL and length: the
    redeclaration is refused (PRECONDITION_FAILED), which used to leave the orchestrator
    retrying forever, consuming nothing, while `/readyz` said ready."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        old = {"x-message-ttl": 90_000, "x-max-length": 5, "x-overflow": "drop-head"}
        await channel.declare_queue(topology.queue, durable=True, arguments=old)
        await channel.declare_queue(topology.rejected_queue, durable=True, arguments=old)
    msg = f.message()
    keys = await keyring(orchestrator, [msg.agent_id])
    with caplog.at_level("WARNING", logger="chiffon"):
        async with consuming(orchestrator, amqp_url, topology) as consumer:
            async with publisher(amqp_url, topology, keys) as pub:
                await pub.publish(msg)
            await eventually(lambda: _applied(orchestrator, msg.agent_id))
            assert consumer.consuming
    advice = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.message]
    assert len(advice) == 2 and all("rabbitmqctl set_policy" in line for line in advice)
    listed = {q["name"]: q for q in _rabbitmqctl("list_queues", "name", "arguments")}
    assert _args(listed[topology.queue]) == old  # used as it is, not redeclared


async def test_the_agents_messages_expire_after_its_heartbeat_timeout(
    amqp_url: str, topology: Topology, orchestrator: Orchestrator
) -> None:
    msg = f.message()
    async with consuming(orchestrator, amqp_url, topology):
        pass  # declares the queues; nothing consumes from here on
    pub = RabbitPublisher(
        amqp_url, timeout_seconds=5, exchange=topology.exchange, message_ttl_seconds=0.5
    )
    try:
        await pub.publish(msg)
    finally:
        await pub.close()
    assert await ready_count(amqp_url, topology.queue) == 1
    await asyncio.sleep(1.0)
    assert await ready_count(amqp_url, topology.queue) == 0  # dropped by the broker


def _rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "--formatter", "json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    parsed: list[dict[str, Any]] = json.loads(out)
    return parsed


def _args(queue: dict[str, Any]) -> dict[str, Any]:
    """rabbitmqctl's JSON lists arguments as [name, AMQP type, value] triples."""
    return {name: value for name, _type, value in queue["arguments"]}


async def test_bad_messages_are_copied_to_rejected_and_counted_and_consuming_goes_on(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    good = f.message()
    keys = await keyring(orchestrator, [good.agent_id])
    invalid = json.loads(f.raw(f.message()))
    invalid["resources"]["gpu_count"] = 3  # but no GPUs listed
    async with consuming(orchestrator, amqp_url, topology):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.exchange)
            for body in (b"{not json", json.dumps(invalid).encode()):
                await exchange.publish(aio_pika.Message(body), "agent.heartbeat.x")
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(good)
        await eventually(lambda: _applied(orchestrator, good.agent_id))
    assert _sample(orchestrator, "chiffon_messages_rejected_total", reason="malformed_json") == 1
    assert _sample(orchestrator, "chiffon_messages_rejected_total", reason="invalid") == 1
    reasons = await _drain_reasons(amqp_url, topology.rejected_queue)
    assert reasons == [(b"{not json", "malformed_json"), (json.dumps(invalid).encode(), "invalid")]
    assert await ready_count(amqp_url, topology.queue) == 0


async def test_a_huge_rejected_message_is_copied_cut_to_its_first_bytes(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    """Ten 10 MB bodies held 105 MB in the rejected queue, bounded by count only."""
    huge = b"{" + b" " * 2_000_000 + b"}"
    async with consuming(orchestrator, amqp_url, topology):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(topology.exchange)
            await exchange.publish(aio_pika.Message(huge), "agent.heartbeat.x")
        await eventually(
            lambda: _counted(orchestrator, "chiffon_messages_rejected_total", reason="too_large")
        )
        await eventually(lambda: _has_ready(amqp_url, topology.rejected_queue))
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.rejected_queue)
        copy = await queue.get(no_ack=True)
    assert copy.body == huge[: topology.rejected_copy_bytes]
    assert copy.headers["x-chiffon-original-bytes"] == len(huge)
    assert copy.headers[REJECT_REASON_HEADER] == "too_large"


async def _counted(orch: Orchestrator, name: str, **labels: str) -> bool:
    return _sample(orch, name, **labels) >= 1


async def _has_ready(url: str, queue: str) -> bool:
    return await ready_count(url, queue) >= 1


async def _drain_reasons(url: str, queue_name: str) -> list[tuple[bytes, Any]]:
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


async def test_database_error_requeues_and_the_message_is_applied_once_it_is_back(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    msg = f.message()
    keys = await keyring(orchestrator, [msg.agent_id])
    flaky = FlakySessions(orchestrator.batcher._sessions)
    orchestrator.batcher._sessions = flaky  # type: ignore[assignment]
    async with consuming(orchestrator, amqp_url, topology) as consumer:
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(msg)
        await eventually(lambda: _requeued(orchestrator, 2))  # handed out again, failed again
        assert await agent_row(orchestrator, msg.agent_id) is None
        assert consumer.consumed == 0
        flaky.down = False
        await eventually(lambda: _applied(orchestrator, msg.agent_id))
    assert await ready_count(amqp_url, topology.queue) == 0
    assert _sample(orchestrator, "chiffon_ingest_errors_total") >= 2


async def _requeued(orch: Orchestrator, n: int) -> bool:
    return _sample(orch, "chiffon_amqp_requeued_total") >= n


async def test_publisher_against_a_closed_port_fails_fast() -> None:
    pub = RabbitPublisher(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(TransportError):
        await pub.publish(f.message())
    assert time.monotonic() - started < 2.5


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung broker)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_publisher_against_a_silent_broker_gives_up_within_its_timeout(
    silent_port: int,
) -> None:
    pub = RabbitPublisher(f"amqp://guest:guest@127.0.0.1:{silent_port}/", timeout_seconds=1)
    for attempt in (pub.connect(), pub.publish(f.message())):
        started = time.monotonic()
        with pytest.raises(TransportError):
            await attempt
        assert time.monotonic() - started < 1.5
    await pub.close()


async def test_unroutable_publish_is_a_transport_error(amqp_url: str, topology: Topology) -> None:
    async with publisher(amqp_url, topology) as pub:  # declares the exchange, no queue bound
        with pytest.raises(TransportError, match="refused"):
            await pub.publish(f.message())


async def test_consumer_start_does_not_wait_for_an_absent_broker(
    orchestrator: Orchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = RabbitConsumer(
        f"amqp://guest:guest@127.0.0.1:{free_port()}/", orchestrator, backoff=FAST
    )
    await asyncio.wait_for(consumer.start(), 1)
    await asyncio.sleep(0.5)
    assert not consumer.consuming
    assert "retries left: unlimited" in caplog.text
    await consumer.stop()


async def test_competing_consumers_apply_every_message_once(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    second = Orchestrator(orchestrator.settings, clock=orchestrator.clock)
    await second.start(sweep=False)
    messages = [f.message(name=f"desk-{i}") for i in range(300)]
    keys = await keyring(orchestrator, [m.agent_id for m in messages])
    try:
        async with (
            consuming(orchestrator, amqp_url, topology, prefetch=20) as one,
            consuming(second, amqp_url, topology, prefetch=20) as two,
            publisher(amqp_url, topology, keys) as pub,
        ):
            await asyncio.gather(*(pub.publish(m) for m in messages))
            await eventually(lambda: _total(one, two, 300))
    finally:
        await second.stop()
    assert one.consumed > 0 and two.consumed > 0
    applied = sum(
        _sample(o, "chiffon_messages_accepted_total", kind="heartbeat", outcome="applied")
        for o in (orchestrator, second)
    )
    assert applied == 300
    async with orchestrator.sessions() as s:
        rows = await registry.list_agents(s)
    assert {r.agent_id for r in rows} >= {m.agent_id for m in messages}
    assert await ready_count(amqp_url, topology.queue) == 0


async def _total(one: RabbitConsumer, two: RabbitConsumer, n: int) -> bool:
    return one.consumed + two.consumed >= n


@pytest.mark.broker_restart
async def test_consumer_and_publisher_recover_after_a_broker_restart(
    orchestrator: Orchestrator, private_broker: PrivateRabbit
) -> None:
    """On the test run's own RabbitMQ node: the system broker is never stopped."""
    url, topology = private_broker.url, Topology(exchange=f"chiffon-{uuid.uuid4().hex[:8]}")
    topology = Topology(
        exchange=topology.exchange,
        queue=f"{topology.exchange}.agent-events",
        rejected_queue=f"{topology.exchange}.rejected",
    )
    before, after = f.message(), f.message()
    keys = await keyring(orchestrator, [before.agent_id, after.agent_id])
    # The watchdog's timer never fires in this test: the reconnect itself subscribes again.
    async with (
        consuming(orchestrator, url, topology, watchdog_interval_seconds=600) as consumer,
        publisher(url, topology, keys) as pub,
    ):
        await pub.publish(before)
        await eventually(lambda: _applied(orchestrator, before.agent_id))
        with private_broker.stopped():
            pass
        await consumer.wait_consuming(30)
        await _publish_until_accepted(pub, after, within_seconds=30)
        await eventually(lambda: _applied(orchestrator, after.agent_id), within_seconds=15)
        listed = private_broker.ctl("--formatter", "json", "list_queues", "name", "consumers")
        consumers = {q["name"]: q["consumers"] for q in json.loads(listed)}
        assert consumers[topology.queue] == 1
    assert _sample(orchestrator, "chiffon_amqp_reconnects_total") >= 1


async def _publish_until_accepted(pub: RabbitPublisher, msg: Any, *, within_seconds: float) -> None:
    """The agent loop's job, in short: retry the newest snapshot until confirmed."""
    deadline = time.monotonic() + within_seconds
    while True:
        try:
            await pub.publish(msg)
            return
        except TransportError:
            assert time.monotonic() < deadline, "the publisher never got through again"
            await asyncio.sleep(0.5)


async def test_a_consumer_cancelled_by_the_broker_is_subscribed_again(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    """The zero-consumers pitfall: the watchdog notices and re-declares and re-consumes."""
    msg = f.message()
    keys = await keyring(orchestrator, [msg.agent_id])
    async with consuming(orchestrator, amqp_url, topology, watchdog_interval_seconds=0.2) as c:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(topology.queue)  # the broker cancels our consumer
        await eventually(lambda: _consumer_count(amqp_url, topology.queue, 1))
        assert c.consuming
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(msg)
        await eventually(lambda: _applied(orchestrator, msg.agent_id))


async def _consumer_count(url: str, queue: str, n: int) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:  # not declared again yet
            return False
        return declared.declaration_result.consumer_count == n


def test_chiffon_orchestrator_consumes_and_drains_on_sigterm(
    amqp_url: str, topology: Topology, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **TOKENS_ENV,
        "CHIFFON_DATA_DIR": str(tmp_path),
        "CHIFFON_AMQP_EXCHANGE": topology.exchange,
        "CHIFFON_AMQP_QUEUE": topology.queue,
        "CHIFFON_AMQP_REJECTED_QUEUE": topology.rejected_queue,
        "CHIFFON_AMQP_QUEUE_MAX_LENGTH": "1000",
        "CHIFFON_AMQP_REJECTED_MAX_LENGTH": "10",
    }
    assert run_cli("db", "upgrade", env=env).returncode == 0
    port = free_port()
    log = tmp_path / "orchestrator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CHIFFON, "orchestrator", "--port", str(port), "--amqp-url", amqp_url],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            api = f"http://127.0.0.1:{port}"
            wait_http(f"{api}/healthz", proc, log=log)
            _wait_ready_consuming(api)
            msgs = [f.message(name=f"desk-{i}") for i in range(20)]
            keys = {m.agent_id: enroll(api, m.agent_id) for m in msgs}
            asyncio.run(_publish_all(amqp_url, topology, msgs, keys))
            _wait_agents(api, {str(m.agent_id) for m in msgs})
        finally:
            returncode = stop(proc)
    assert returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert asyncio.run(ready_count(amqp_url, topology.queue)) == 0


def _wait_ready_consuming(api: str) -> None:
    deadline = time.monotonic() + 15
    while httpx.get(f"{api}/readyz").json()["checks"].get("amqp") != "hearing":
        assert time.monotonic() < deadline, "the orchestrator never subscribed"
        time.sleep(0.1)


def _wait_agents(api: str, wanted: set[str]) -> None:
    deadline = time.monotonic() + 15

    def listed() -> set[str]:
        agents = httpx.get(f"{api}/api/v1/agents", headers=API_HEADERS).json()
        return {a["agent_id"] for a in agents}

    while not wanted <= listed():
        assert time.monotonic() < deadline, "published heartbeats never reached the registry"
        time.sleep(0.1)


async def _publish_all(url: str, topology: Topology, msgs: list[Any], keys: Credentials) -> None:
    async with publisher(url, topology, keys) as pub:
        for msg in msgs:
            await pub.publish(msg)


async def test_concurrent_publishes_share_one_connection(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    async with consuming(orchestrator, amqp_url, topology):
        pub = RabbitPublisher(amqp_url, exchange=topology.exchange)
        try:
            await asyncio.gather(*(pub.publish(f.message()) for _ in range(50)))
        finally:
            await pub.close()
    assert (pub.sent, pub.connects) == (50, 1)


async def test_orchestrator_that_cannot_hear_its_broker_marks_no_one_offline(
    orchestrator: Orchestrator, clock: Any
) -> None:
    """Broker unreachable for longer than the timeout: silence proves nothing. The sweep
    asks the orchestrator's receivers whether they hear at every sweep."""
    beating = f.message()
    assert await orchestrator.ingest(f.raw(beating)) == "applied"
    clock.advance(orchestrator.settings.heartbeat_timeout_seconds + 1)  # past start-up grace
    consumer = RabbitConsumer(f"amqp://guest:guest@127.0.0.1:{free_port()}/", orchestrator)
    orchestrator.add_receiver(consumer)
    await consumer.start()
    try:
        clock.advance(orchestrator.settings.heartbeat_timeout_seconds * 3)
        assert await orchestrator.sweeper.sweep_once() == []
        assert (await orchestrator.readiness())["amqp"] == "not hearing"
    finally:
        await consumer.stop()
        orchestrator.receivers.remove(consumer)
    # Without that receiver the same silence is judged (after the grace of hearing again):
    # the check above could fail.
    assert await orchestrator.sweeper.sweep_once() == []
    clock.advance(orchestrator.settings.heartbeat_timeout_seconds + 1)
    assert await orchestrator.sweeper.sweep_once() == [str(beating.agent_id)]
