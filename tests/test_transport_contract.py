"""One contract, three transports: the same scenarios through the in-memory twin, HTTP (a
real uvicorn serving the API on a socket) and RabbitMQ (a real broker), into one
orchestrator. What a transport may differ in is only how a refusal is told to the agent
(an exception, an HTTP status, a copy in `chiffon.rejected`); what reaches the registry and
what is counted must be the same."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.auth import Credentials
from chiffon.transport.base import Publisher, TransportError
from chiffon.transport.http import HttpPublisher
from chiffon.transport.memory import InMemoryPublisher
from chiffon.transport.rabbitmq.publisher import RabbitPublisher
from tests import factories as f
from tests.auth import keyring
from tests.conftest import serving
from tests.rabbitmq.helpers import agent_row, consuming, sample, scratch_topology
from tests.services import AMQP_URL, eventually, need

Connect = Callable[[Credentials], Publisher]


@pytest.fixture
def clock() -> ManualClock:
    """Real time: signed messages must be inside the replay window."""
    return ManualClock(datetime.now(UTC))


@pytest.fixture(params=["memory", "http", "amqp"])
async def connect(
    request: pytest.FixtureRequest, orchestrator: Orchestrator
) -> AsyncIterator[Connect]:
    """A way to open a publisher with some credentials, for each transport."""
    if request.param == "memory":
        yield lambda creds: InMemoryPublisher(orchestrator.ingest, credential=creds)
    elif request.param == "http":
        async with serving(orchestrator) as url:
            yield lambda creds: HttpPublisher(url, timeout_seconds=5, credential=creds)
    else:
        need("RabbitMQ", "127.0.0.1", 5672)
        async with (
            scratch_topology(AMQP_URL) as topology,
            consuming(orchestrator, AMQP_URL, topology),
        ):
            yield lambda creds: RabbitPublisher(
                AMQP_URL, timeout_seconds=5, exchange=topology.exchange, credential=creds
            )


async def _send(connect: Connect, creds: Credentials, *messages: Any) -> None:
    """Publish as an agent does; a refusal told to the agent is not the contract here."""
    publisher = connect(creds)
    await publisher.connect()
    try:
        for message in messages:
            with contextlib.suppress(TransportError):
                await publisher.publish(message)
    finally:
        await publisher.close()


async def _status(orchestrator: Orchestrator, agent_id: uuid.UUID) -> str | None:
    row = await agent_row(orchestrator, agent_id)
    return None if row is None else str(row.status)


async def test_a_heartbeat_registers_and_a_goodbye_marks_offline(
    orchestrator: Orchestrator, connect: Connect, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    keys = await keyring(orchestrator, [agent])
    beat = f.message(agent, seq=1, sent_at=clock.now(), res=f.resources(gpus_free_total=[(6, 8)]))
    await _send(connect, keys, beat)
    await eventually(lambda: _is(orchestrator, agent, "online"))
    row = await agent_row(orchestrator, agent)
    assert (row.gpu_vram_available_gb, row.last_seq) == (6.0, 1)
    await _send(connect, keys, f.message(agent, kind="offline", seq=2, sent_at=clock.now()))
    await eventually(lambda: _is(orchestrator, agent, "offline"))


async def test_another_agents_credential_changes_nothing_and_is_counted(
    orchestrator: Orchestrator, connect: Connect, clock: ManualClock
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    keys = await keyring(orchestrator, [a, b])
    forged = f.message(b, name="forged", sent_at=clock.now())
    await _send(connect, keys[a], forged)  # A's credential, B's message
    await eventually(lambda: _refused(orchestrator, {"bad_signature", "bad_credential"}))
    assert await _status(orchestrator, b) is None


async def test_an_invalid_message_is_counted_and_the_next_one_applied(
    orchestrator: Orchestrator, connect: Connect, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    keys = await keyring(orchestrator, [agent])
    invalid = f.message(agent, seq=1, sent_at=clock.now()).model_copy(update={"seq": -1})
    valid = f.message(agent, seq=2, sent_at=clock.now())
    await _send(connect, keys, invalid, valid)
    await eventually(lambda: _is(orchestrator, agent, "online"))
    assert (await agent_row(orchestrator, agent)).last_seq == 2
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="invalid") == 1


async def _is(orchestrator: Orchestrator, agent_id: uuid.UUID, status: str) -> bool:
    return await _status(orchestrator, agent_id) == status


async def _refused(orchestrator: Orchestrator, reasons: set[str]) -> bool:
    counted = sum(
        sample(orchestrator, "chiffon_messages_rejected_total", reason=r) for r in reasons
    )
    return counted >= 1
