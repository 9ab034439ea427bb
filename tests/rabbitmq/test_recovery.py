"""Outages: the database, the broker, a cancelled subscription, a silent port, SIGTERM.
On both registry engines."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.base import TransportError
from chiffon.transport.rabbitmq.consumer import RabbitConsumer, State
from chiffon.transport.rabbitmq.publisher import RabbitPublisher
from chiffon.transport.rabbitmq.topology import Topology
from tests import factories as f
from tests.auth import TOKENS_ENV, enroll, keyring
from tests.private_services import PrivateRabbit
from tests.procs import CHIFFON, free_port, run_cli, stop, wait_http
from tests.rabbitmq.helpers import (
    FAST,
    FlakySessions,
    agent_row,
    applied,
    consumer_count,
    consuming,
    moves,
    publish_all,
    publish_until_accepted,
    publisher,
    ready_count,
    requeued,
    sample,
    wait_agents,
    wait_ready_consuming,
)
from tests.services import eventually


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
        await eventually(lambda: requeued(orchestrator, 2))  # handed out again, failed again
        assert await agent_row(orchestrator, msg.agent_id) is None
        assert consumer.consumed == 0
        flaky.down = False
        await eventually(lambda: applied(orchestrator, msg.agent_id))
    assert await ready_count(amqp_url, topology.queue) == 0
    assert sample(orchestrator, "chiffon_ingest_errors_total") >= 2


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


async def test_consumer_start_does_not_wait_for_an_absent_broker(
    orchestrator: Orchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = RabbitConsumer(
        f"amqp://guest:guest@127.0.0.1:{free_port()}/", orchestrator, backoff=FAST
    )
    await asyncio.wait_for(consumer.start(), 1)
    await eventually(lambda: _logged(caplog, "retries left: unlimited"))
    assert consumer.state is State.CONNECTING and not consumer.consuming
    await consumer.stop()
    assert consumer.state is State.STOPPED


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text


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
        await eventually(lambda: applied(orchestrator, before.agent_id))
        with private_broker.stopped():
            pass
        await consumer.wait_consuming(30)
        await publish_until_accepted(pub, after, within_seconds=30)
        await eventually(lambda: applied(orchestrator, after.agent_id), within_seconds=15)
        listed = private_broker.ctl("--formatter", "json", "list_queues", "name", "consumers")
        consumers = {q["name"]: q["consumers"] for q in json.loads(listed)}
        assert consumers[topology.queue] == 1
    assert sample(orchestrator, "chiffon_amqp_reconnects_total") >= 1


async def test_a_consumer_cancelled_by_the_broker_is_subscribed_again(
    orchestrator: Orchestrator,
    amqp_url: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The zero-consumers pitfall: the watchdog notices and re-declares and re-consumes."""
    msg = f.message()
    keys = await keyring(orchestrator, [msg.agent_id])
    caplog.set_level("DEBUG", logger="chiffon.transport.rabbitmq.consumer")
    async with consuming(orchestrator, amqp_url, topology, watchdog_interval_seconds=0.2) as c:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(topology.queue)  # the broker cancels our consumer
        await eventually(lambda: consumer_count(amqp_url, topology.queue, 1))
        assert c.consuming
        async with publisher(amqp_url, topology, keys) as pub:
            await pub.publish(msg)
        await eventually(lambda: applied(orchestrator, msg.agent_id))
    assert moves(caplog) == [
        "stopped -> connecting",
        "connecting -> consuming",
        "consuming -> lost",
        "lost -> consuming",
        "consuming -> stopping",
        "stopping -> stopped",
    ]


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
            wait_ready_consuming(api)
            msgs = [f.message(name=f"desk-{i}") for i in range(20)]
            keys = {m.agent_id: enroll(api, m.agent_id) for m in msgs}
            asyncio.run(publish_all(amqp_url, topology, msgs, keys))
            wait_agents(api, {str(m.agent_id) for m in msgs})
        finally:
            returncode = stop(proc)
    assert returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert asyncio.run(ready_count(amqp_url, topology.queue)) == 0


async def test_orchestrator_that_cannot_hear_its_broker_marks_no_one_offline(
    orchestrator: Orchestrator, clock: Any
) -> None:
    """Broker unreachable for longer than the timeout: silence proves nothing. The sweep
    asks the orchestrator's receivers whether they hear at every sweep."""
    beating = f.message()
    assert await orchestrator.ingest(f.raw(beating)) == "applied"
    liveness = orchestrator.settings
    grace = liveness.heartbeat_interval_seconds + liveness.heartbeat_timeout_seconds
    clock.advance(grace + 1)  # past start-up grace
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
    clock.advance(grace + 1)
    assert await orchestrator.sweeper.sweep_once() == [str(beating.agent_id)]
