"""A hostile enrolled agent beside honest ones, on PostgreSQL, over each transport.

One agent's message that PostgreSQL cannot store used to fail the write of its whole
batch: over HTTP every honest heartbeat got a 503, over RabbitMQ the batch was requeued and
the consumer paused, and the fleet went stale. Two depths are tested here: the schema
refuses what the database would (NUL, offsets past +-15:59), and a message the database
still refuses is set aside alone ("unstorable") while its neighbours commit. For the second,
the database itself refuses one name: a trigger raising SQLSTATE 22023 (a data exception),
as PostgreSQL does for a value it cannot store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aio_pika
import httpx
import psycopg
import pytest

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.transport.auth import SIGNATURE_HEADER, AgentCredential
from chiffon.transport.rabbitmq.topology import Topology
from tests import factories as f
from tests.auth import bearer, issue, keyring
from tests.conftest import api_client
from tests.rabbitmq.helpers import (
    agent_row,
    consuming,
    drain_reasons,
    ready_count,
    sample,
)
from tests.services import eventually

POISON = "refused-by-the-database"


@pytest.fixture
def database_refuses_one_name(postgres_url: str) -> Iterator[None]:
    """A trigger that makes PostgreSQL refuse any agent row named `POISON`."""
    conninfo = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION chiffon_test_refuse() RETURNS trigger AS $$ BEGIN "
            f"IF NEW.name = '{POISON}' THEN "
            "RAISE EXCEPTION 'value refused' USING ERRCODE = '22023'; END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.execute(
            "CREATE TRIGGER chiffon_test_refuse BEFORE INSERT OR UPDATE ON agent_registry "
            "FOR EACH ROW EXECUTE FUNCTION chiffon_test_refuse()"
        )
    try:
        yield
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("DROP TRIGGER chiffon_test_refuse ON agent_registry")
            conn.execute("DROP FUNCTION chiffon_test_refuse()")


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(orchestrator) as client:
        yield client


def _body(agent_id: uuid.UUID, clock: ManualClock, seq: int, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        f.raw(f.message(agent_id, name=f"honest-{agent_id.hex[:6]}", seq=seq, sent_at=clock.now()))
    )
    body.update(changes)
    return body


async def _post(
    api: httpx.AsyncClient, credential: AgentCredential, body: dict[str, Any]
) -> httpx.Response:
    return await api.post(
        f"/api/v1/agents/{credential.agent_id}/heartbeat",
        content=json.dumps(body),
        headers={**bearer(credential), "content-type": "application/json"},
    )


def _hostile_bodies(agent_id: uuid.UUID, clock: ManualClock, seq: int) -> list[dict[str, Any]]:
    """Every string PostgreSQL's text or jsonb refuses, in each kind of place it can hide."""
    nul = "a\u0000b"
    base = _body(agent_id, clock, seq)
    with_gpu = json.loads(f.raw(f.message(agent_id, res=f.resources(gpus_free_total=[(1, 2)]))))
    gpu_named = {**with_gpu["resources"], "gpus": [{**with_gpu["resources"]["gpus"][0]}]}
    gpu_named["gpus"][0]["name"] = nul
    return [
        {**base, "name": nul},
        {**base, "pool_name": nul},
        {**base, "agent_version": nul},
        {**base, "labels": {"room": nul}},
        {**base, "capabilities": [nul]},
        {**base, "resources": {**base["resources"], "probe_errors": {"nvml": nul}}},
        {**base, "resources": gpu_named},
    ]


async def test_http_hostile_agent_beside_honest_ones_never_makes_them_stale(
    orchestrator: Orchestrator, api: httpx.AsyncClient, clock: ManualClock
) -> None:
    honest = [await issue(orchestrator, uuid.uuid4()) for _ in range(5)]
    hostile = await issue(orchestrator, uuid.uuid4())
    for seq in range(1, 6):
        attacks = _hostile_bodies(hostile.agent_id, clock, seq)
        answers = await asyncio.gather(
            *(_post(api, c, _body(c.agent_id, clock, seq)) for c in honest),
            *(_post(api, hostile, body) for body in attacks),
        )
        assert [r.status_code for r in answers[: len(honest)]] == [200] * len(honest)
        assert {r.status_code for r in answers[len(honest) :]} == {422}
        for credential in honest:  # every honest beat of this round is the one stored
            row = await agent_row(orchestrator, credential.agent_id)
            assert (row.status, row.last_seq, row.last_heartbeat_at) == ("online", seq, clock.now())
        clock.advance(1)
    assert await agent_row(orchestrator, hostile.agent_id) is None
    assert sample(orchestrator, "chiffon_ingest_errors_total") == 0


async def test_an_offset_postgresql_refuses_is_stored_in_utc(
    orchestrator: Orchestrator, api: httpx.AsyncClient, clock: ManualClock
) -> None:
    credential = await issue(orchestrator, uuid.uuid4())
    far_east = clock.now().astimezone(timezone(timedelta(hours=23, minutes=59)))
    body = _body(credential.agent_id, clock, 1, sent_at=far_east.isoformat())
    assert body["sent_at"].endswith("+23:59")
    answer = await _post(api, credential, body)
    assert answer.status_code == 200, answer.text
    row = await agent_row(orchestrator, credential.agent_id)
    assert row.last_sent_at == clock.now()


@pytest.mark.usefixtures("database_refuses_one_name")
async def test_http_a_message_the_database_refuses_fails_alone(
    orchestrator: Orchestrator, api: httpx.AsyncClient, clock: ManualClock
) -> None:
    honest = [await issue(orchestrator, uuid.uuid4()) for _ in range(20)]
    hostile = await issue(orchestrator, uuid.uuid4())
    poison = _body(hostile.agent_id, clock, 1, name=POISON)
    answers = await asyncio.gather(
        *(_post(api, c, _body(c.agent_id, clock, 1)) for c in honest[:10]),
        _post(api, hostile, poison),
        *(_post(api, c, _body(c.agent_id, clock, 1)) for c in honest[10:]),
    )
    refused = answers.pop(10)
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("unstorable: the registry database refused")
    assert [r.status_code for r in answers] == [200] * 20
    for credential in honest:
        assert (await agent_row(orchestrator, credential.agent_id)).status == "online"
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="unstorable") == 1
    assert sample(orchestrator, "chiffon_ingest_errors_total") == 0


async def _publish_signed(
    url: str, topology: Topology, bodies: list[tuple[bytes, AgentCredential]]
) -> None:
    """Publish raw bodies, each signed with its agent's credential, as one agent would."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.exchange)
        for raw, credential in bodies:
            headers = {SIGNATURE_HEADER: credential.sign(raw)}
            await exchange.publish(aio_pika.Message(raw, headers=headers), "agent.heartbeat.x")


@pytest.mark.usefixtures("database_refuses_one_name")
async def test_amqp_hostile_messages_are_set_aside_and_the_honest_ones_commit(
    orchestrator: Orchestrator, amqp_url: str, topology: Topology, clock: ManualClock
) -> None:
    honest_ids = [uuid.uuid4() for _ in range(10)]
    hostile_id = uuid.uuid4()
    keys = await keyring(orchestrator, [*honest_ids, hostile_id])
    honest = [(json.dumps(_body(a, clock, 1)).encode(), keys[a]) for a in honest_ids]
    nul = json.dumps(_body(hostile_id, clock, 1, name="a\u0000b")).encode()
    poison = json.dumps(_body(hostile_id, clock, 2, name=POISON)).encode()
    async with consuming(orchestrator, amqp_url, topology) as consumer:
        await _publish_signed(
            amqp_url,
            topology,
            [*honest[:5], (nul, keys[hostile_id]), (poison, keys[hostile_id]), *honest[5:]],
        )
        await eventually(lambda: _all_online(orchestrator, honest_ids))
        await eventually(lambda: _rejected(orchestrator, 2))
        assert consumer.consuming
    assert await agent_row(orchestrator, hostile_id) is None
    assert sample(orchestrator, "chiffon_amqp_requeued_total") == 0
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="invalid") == 1
    assert sample(orchestrator, "chiffon_messages_rejected_total", reason="unstorable") == 1
    assert await drain_reasons(amqp_url, topology.rejected_queue) == [
        (nul, "invalid"),
        (poison, "unstorable"),
    ]
    assert await ready_count(amqp_url, topology.queue) == 0


async def _all_online(orch: Orchestrator, agent_ids: list[uuid.UUID]) -> bool:
    rows = [await agent_row(orch, a) for a in agent_ids]
    return all(row is not None and row.status == "online" for row in rows)


async def _rejected(orch: Orchestrator, n: int) -> bool:
    total = sum(
        sample(orch, "chiffon_messages_rejected_total", reason=r) for r in ("invalid", "unstorable")
    )
    return total >= n


def test_offsets_and_dates_past_the_databases_range_are_normalised_or_refused() -> None:
    """The class behind `+23:59`: any aware time is stored in UTC, or refused when it
    leaves Python's range once converted."""
    from pydantic import ValidationError

    from chiffon.schemas.heartbeat import AgentMessage

    body = json.loads(f.raw(f.message()))
    body["sent_at"] = "9999-12-31T23:00:00-14:00"
    with pytest.raises(ValidationError, match="out of range once converted to UTC"):
        AgentMessage.model_validate_json(json.dumps(body))
    body["sent_at"] = "2026-12-02T10:00:00-23:59"
    parsed = AgentMessage.model_validate_json(json.dumps(body))
    assert parsed.sent_at == datetime(2026, 12, 3, 9, 59, tzinfo=UTC)
    assert parsed.sent_at.utcoffset() == timedelta(0)
