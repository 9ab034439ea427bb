"""Faults in the message stream over a real RabbitMQ: poison, spoofing, replay (5, 6, 7)."""

from __future__ import annotations

import json
import uuid

import aio_pika

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.auth import SIGNATURE_HEADER
from chiffon.transport.rabbitmq.topology import REJECT_REASON_HEADER, Topology
from tests import factories as f
from tests.auth import keyring
from tests.rabbitmq.helpers import (
    agent_row,
    applied,
    consuming,
    drain_reasons,
    publisher,
    ready_count,
    sample,
)
from tests.services import eventually


async def _publish_raw(url: str, topology: Topology, body: bytes, headers: dict[str, str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.exchange)
        await exchange.publish(aio_pika.Message(body, headers=headers), "agent.heartbeat.x")


async def test_5_poison_between_two_valid_messages_lands_in_rejected_and_consuming_goes_on(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    first, last = f.message(name="first"), f.message(name="last")
    keys = await keyring(orchestrator, [first.agent_id, last.agent_id])
    poison = b'{"schema_version": 1, "agent_id": "\xff\xfe", "seq": NaN'
    async with consuming(orchestrator, amqp_url, topology) as consumer:
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(first)
            await _publish_raw(amqp_url, topology, poison, {})
            await pub.publish(last)
        await eventually(lambda: applied(orchestrator, last.agent_id))
        assert await applied(orchestrator, first.agent_id)
        assert consumer.consuming
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="malformed_json") == 1
    assert await drain_reasons(amqp_url, topology.rejected_queue) == [(poison, "malformed_json")]
    assert await ready_count(amqp_url, topology.queue) == 0


async def test_6_agent_a_signing_a_heartbeat_as_b_changes_nothing_and_is_counted(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology, clock: ManualClock
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    keys = await keyring(orchestrator, [a, b])
    real_b = f.message(b, name="desk-b", seq=1, res=f.resources(gpus_free_total=[(8.0, 24.0)]))
    forged = f.message(b, name="evil", seq=2, res=f.resources(gpus_free_total=[(24.0, 24.0)]))
    async with consuming(orchestrator, amqp_url, topology):
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(real_b)
        await eventually(lambda: applied(orchestrator, b))
        before = await agent_row(orchestrator, b)
        clock.advance(5)
        async with publisher(amqp_url, topology, keys[a]) as pub_a:  # A's key, B's id
            await pub_a.publish(forged)
        body = f.raw(forged)
        await _publish_raw(amqp_url, topology, body, {})  # no signature at all
        await eventually(lambda: _rejected_total(orchestrator, 2))
    after = await agent_row(orchestrator, b)
    assert (after.name, after.gpu_vram_available_gb, after.last_seq) == ("desk-b", 8.0, 1)
    assert after.last_heartbeat_at == before.last_heartbeat_at
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="bad_signature") == 1
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="unauthenticated") == 1
    reasons = [r for _, r in await drain_reasons(amqp_url, topology.rejected_queue)]
    assert reasons == ["bad_signature", "unauthenticated"]


async def _rejected_total(orch: Orchestrator, n: int) -> bool:
    reasons = ("bad_signature", "unauthenticated", "clock_skew")
    total = sum(sample(orch, "chiffon_messages_rejected_total", reason=r) for r in reasons)
    return total >= n


async def test_7_a_replayed_or_older_signed_message_has_no_effect(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    keys = await keyring(orchestrator, [agent])
    older = f.message(agent, seq=10, res=f.resources(memory_available_gb=10.0))
    newer = f.message(agent, seq=11, res=f.resources(memory_available_gb=20.0))
    ancient = f.message(agent, seq=12, sent_at=f.later(clock.now(), -3600))
    async with (
        consuming(orchestrator, amqp_url, topology),
        publisher(amqp_url, topology, keys) as pub,
    ):
        await pub.publish(older)
        await pub.publish(newer)
        await eventually(lambda: _outcomes(orchestrator, applied=2))
        seen = await agent_row(orchestrator, agent)
        clock.advance(10)  # a message applied now would move last_heartbeat_at
        signed = keys[agent].sign(f.raw(newer))
        await _publish_raw(amqp_url, topology, f.raw(newer), {SIGNATURE_HEADER: signed})
        await pub.publish(older)  # an older one after a newer one
        await pub.publish(ancient)  # outside the replay window
        await eventually(lambda: _outcomes(orchestrator, applied=2, stale=2))
        await eventually(lambda: _rejected_total(orchestrator, 1))
    row = await agent_row(orchestrator, agent)
    assert (row.last_seq, row.memory_available_gb) == (11, 20.0)
    assert row.last_heartbeat_at == seen.last_heartbeat_at
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="clock_skew") == 1
    got = await drain_reasons(amqp_url, topology.rejected_queue)
    assert [json.loads(body)["seq"] for body, _ in got] == [12]
    assert [reason for _, reason in got] == ["clock_skew"]
    assert REJECT_REASON_HEADER  # the reason travels in this header


async def _outcomes(orch: Orchestrator, *, applied: int, stale: int = 0) -> bool:
    def count(outcome: str) -> float:
        return sample(orch, "chiffon_messages_accepted_total", kind="heartbeat", outcome=outcome)

    return count("applied") >= applied and count("stale") >= stale
