"""What agents and orchestrators agree on in the broker: routing keys, queue arguments,
expiration, the rejected queue, publishing. On both registry engines."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest

from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.base import TransportError
from chiffon.transport.rabbitmq.publisher import RabbitPublisher
from chiffon.transport.rabbitmq.topology import REJECT_REASON_HEADER, Topology
from tests import factories as f
from tests.auth import keyring
from tests.rabbitmq.helpers import (
    applied,
    consuming,
    counted,
    drain_reasons,
    get_routed,
    has_ready,
    publisher,
    queue_arguments,
    rabbitmqctl,
    ready_count,
    sample,
)
from tests.services import eventually


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
        got = [await get_routed(probe) for _ in range(2)]
    assert [m.routing_key for m in got] == [f"agent.heartbeat.{agent}", f"agent.offline.{agent}"]
    assert {m.content_type for m in got} == {"application/json"}
    assert json.loads(got[1].body)["kind"] == "offline"


async def test_queues_carry_the_documented_arguments(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    async with consuming(orchestrator, amqp_url, topology, prefetch=300):
        listed = rabbitmqctl("list_queues", "name", "durable", "arguments", "consumers")
    queues = {q["name"]: q for q in listed}
    events, rejected = queues[topology.queue], queues[topology.rejected_queue]
    assert events["durable"] and rejected["durable"]
    # no x-message-ttl: a changed heartbeat timeout must never meet a queue declared with
    # another (each agent sets its messages' expiration instead)
    assert queue_arguments(events) == {"x-max-length": 1000, "x-overflow": "drop-head"}
    assert "x-dead-letter-exchange" not in queue_arguments(events)
    assert queue_arguments(rejected) == {
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
            await eventually(lambda: applied(orchestrator, msg.agent_id))
            assert consumer.consuming
    advice = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.message]
    assert len(advice) == 2 and all("rabbitmqctl set_policy" in line for line in advice)
    listed = {q["name"]: q for q in rabbitmqctl("list_queues", "name", "arguments")}
    assert queue_arguments(listed[topology.queue]) == old  # used as it is, not redeclared


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
    await eventually(lambda: _none_ready(amqp_url, topology.queue))  # dropped by the broker


async def _none_ready(url: str, queue: str) -> bool:
    return await ready_count(url, queue) == 0


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
        await eventually(lambda: applied(orchestrator, good.agent_id))
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="malformed_json") == 1
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="invalid") == 1
    reasons = await drain_reasons(amqp_url, topology.rejected_queue)
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
            lambda: counted(orchestrator, "chiffon_messages_rejected_total", reason="too_large")
        )
        await eventually(lambda: has_ready(amqp_url, topology.rejected_queue))
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.rejected_queue)
        copy = await queue.get(no_ack=True)
    assert copy.body == huge[: topology.rejected_copy_bytes]
    assert copy.headers["x-chiffon-original-bytes"] == len(huge)
    assert copy.headers[REJECT_REASON_HEADER] == "too_large"


async def test_unroutable_publish_is_a_transport_error(amqp_url: str, topology: Topology) -> None:
    async with publisher(amqp_url, topology) as pub:  # declares the exchange, no queue bound
        with pytest.raises(TransportError, match="refused"):
            await pub.publish(f.message())


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
