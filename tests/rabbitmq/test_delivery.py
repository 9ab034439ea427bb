"""Deliveries through a real broker: applied, acked after commit, in as few frames as the
rules allow, never acked before the write; the consumer's states. On both registry engines."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest

from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from chiffon.transport.rabbitmq.consumer import MOVES, RabbitConsumer, State
from chiffon.transport.rabbitmq.topology import Topology
from tests import factories as f
from tests.auth import keyring
from tests.rabbitmq.helpers import (
    FAST,
    HoldingTarget,
    agent_row,
    applied,
    consumed,
    consuming,
    drain_a_backlog,
    gated,
    moves,
    publisher,
    ready_count,
    sample,
    total_consumed,
    unacked,
)
from tests.services import eventually


async def test_heartbeat_round_trip_is_applied_then_acked(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    msg = f.message(name="render-07", res=f.resources(gpus_free_total=[(20.0, 24.0)]))
    keys = await keyring(orchestrator, [msg.agent_id])
    async with consuming(orchestrator, amqp_url, topology) as consumer:
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(msg)  # returns after the broker's confirm
        await eventually(lambda: applied(orchestrator, msg.agent_id))
    row = await agent_row(orchestrator, msg.agent_id)
    assert (row.status, row.name, row.gpu_vram_available_gb) == ("online", "render-07", 20.0)
    assert consumer.consumed == 1
    # After the consumer is gone an unacked message would be ready again: none is.
    assert await ready_count(amqp_url, topology.queue) == 0


async def test_backlog_is_applied_in_batches_not_one_transaction_per_message(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology
) -> None:
    await drain_a_backlog(orchestrator, amqp_url, topology, 200)
    batches = sample(orchestrator, "chiffon_ingest_batch_size_count")
    assert batches < 50, f"{batches} transactions for 200 messages: not batched"
    assert await ready_count(amqp_url, topology.queue) == 0


async def test_the_acks_of_a_batch_travel_as_one_frame(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology, monkeypatch: Any
) -> None:
    acks: list[tuple[int, bool]] = []
    real_ack = aiormq.Channel.basic_ack

    async def counted(channel: Any, delivery_tag: int, multiple: bool = False, **kw: Any) -> None:
        acks.append((delivery_tag, multiple))
        await real_ack(channel, delivery_tag, multiple, **kw)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    await drain_a_backlog(orchestrator, amqp_url, topology, 300)
    assert await ready_count(amqp_url, topology.queue) == 0  # every one acked
    batches = sample(orchestrator, "chiffon_ingest_batch_size_count")
    assert all(multiple for _, multiple in acks)
    assert len(acks) <= batches + 1, f"{len(acks)} ack frames for {batches} commits"
    assert max(tag for tag, _ in acks) == 300


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
        await eventually(lambda: consumed(consumer, 51))
        await consumer.flush_acks()  # every ack settled so far is written now
        # `first` is acked; the held message is not, nor (held back) the 50 after it. (An
        # ack covering `held` would go out with first's, from 52 unacked straight to 0.)
        await eventually(lambda: _unacked_is(topology.queue, 51))
        assert await agent_row(orchestrator, held.agent_id) is None

        ((gate, message),) = target.gates
        gate.set_result(await orchestrator.receive(message))  # now it commits
        await eventually(lambda: consumed(consumer, 52))
        await consumer.flush_acks()
        await eventually(lambda: _unacked_is(topology.queue, 0))
    finally:
        await consumer.stop()
    assert await ready_count(amqp_url, topology.queue) == 0
    assert (await agent_row(orchestrator, held.agent_id)).status == "online"


async def test_a_failed_write_in_the_middle_is_redelivered_and_the_rest_acked_once(
    orchestrator: Orchestrator,
    amqp_url: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="chiffon.transport.rabbitmq.consumer")
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
        await eventually(lambda: consumed(consumer, 20))
        ((gate, _message),) = target.gates
        gate.set_exception(RuntimeError("the database went away"))  # nacked, requeued
        await eventually(lambda: gated(target, 2))  # the broker handed it out again
        gate, message = target.gates[1]
        gate.set_result(await orchestrator.receive(message))
        await eventually(lambda: consumed(consumer, 21))
    finally:
        await consumer.stop()
    assert await ready_count(amqp_url, topology.queue) == 0
    assert sample(orchestrator, "chiffon_amqp_requeued_total") == 1
    handled = {
        outcome: sample(
            orchestrator, "chiffon_messages_accepted_total", kind="heartbeat", outcome=outcome
        )
        for outcome in ("applied", "stale")
    }
    assert handled == {"applied": 21, "stale": 0}  # each once: no ack lost, none redelivered
    # The failed write paused the consumer; the backoff over, it subscribed again.
    assert moves(caplog) == [
        "stopped -> connecting",
        "connecting -> consuming",
        "consuming -> paused",
        "paused -> consuming",
        "consuming -> stopping",
        "stopping -> stopped",
    ]


def test_every_state_is_reachable_and_every_running_state_can_stop() -> None:
    reached, frontier = {State.STOPPED}, [State.STOPPED]
    while frontier:
        for state in MOVES[frontier.pop()] - reached:
            reached.add(state)
            frontier.append(state)
    assert reached == set(State)
    running = set(State) - {State.STOPPED, State.STOPPING}
    assert all(State.STOPPING in MOVES[s] for s in running)
    assert MOVES[State.STOPPING] == {State.STOPPED}


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
        await eventually(lambda: gated(target, 2))
        (slow_gate, _), (failing_gate, _) = target.gates
        failing_gate.set_exception(RuntimeError("the database went away"))  # pause, resume
        await eventually(lambda: gated(target, 3))  # redelivered (old channel or fresh)
        await eventually(lambda: _in_state(consumer, State.CONSUMING))  # resumed: subscribed
        # on a fresh channel, and waiting for the old one's write in hand before closing it
        slow_gate.set_result(await orchestrator.receive(slow))  # commits while resuming
        gate, message = target.gates[2]
        assert message.agent_id == failing.agent_id
        gate.set_result(await orchestrator.receive(message))
        await eventually(lambda: consumed(consumer, 2))
    finally:
        await consumer.stop(drain_timeout_seconds=2)
    assert await ready_count(amqp_url, topology.queue) == 0
    assert [m.agent_id for _, m in target.gates].count(slow.agent_id) == 1  # never again


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
            await eventually(lambda: total_consumed(one, two, 300))
    finally:
        await second.stop()
    assert one.consumed > 0 and two.consumed > 0
    applied = sum(
        sample(o, "chiffon_messages_accepted_total", kind="heartbeat", outcome="applied")
        for o in (orchestrator, second)
    )
    assert applied == 300
    async with orchestrator.sessions() as s:
        rows = await registry.list_agents(s)
    assert {r.agent_id for r in rows} >= {m.agent_id for m in messages}
    assert await ready_count(amqp_url, topology.queue) == 0


async def _unacked_is(queue: str, n: int) -> bool:
    return await asyncio.to_thread(unacked, queue) == n


async def _in_state(consumer: RabbitConsumer, state: State) -> bool:
    return consumer.state is state
