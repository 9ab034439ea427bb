"""Heartbeat ingest on both engines: registration, ordering, goodbyes, batching."""

from __future__ import annotations

import asyncio
import uuid

from chiffon.orchestrator.batcher import IngestBatcher
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.ingest import Received
from chiffon.orchestrator.metrics import OrchestratorMetrics
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from chiffon.schemas.heartbeat import Resources
from tests import factories as f


async def test_unknown_agent_is_registered_online_with_its_metrics(
    orchestrator: Orchestrator,
) -> None:
    msg = f.message(name="render-01", res=f.resources(gpus_free_total=[(7.5, 8.0)]))
    assert await orchestrator.receive(msg) == "applied"
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=msg.agent_id)
        events = await registry.list_events(s, agent_id=msg.agent_id)
    assert row is not None
    assert (row.status, row.name, row.gpu_vram_available_gb, row.gpu_count) == (
        "online",
        "render-01",
        7.5,
        1,
    )
    assert row.resource_metrics["gpus"][0]["vram_total_gb"] == 8.0
    assert [(e.from_status, e.to_status, e.reason) for e in events] == [
        (None, "online", "registered")
    ]


async def test_receipt_time_is_the_orchestrators_clock_not_the_agents(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    skewed = f.later(clock.now(), -3 * 3600)  # the desktop's clock is 3 h behind
    msg = f.message(sent_at=skewed)
    await orchestrator.receive(msg)
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=msg.agent_id)
    assert row is not None and row.last_heartbeat_at == clock.now()


async def test_older_heartbeat_arriving_late_is_ignored(orchestrator: Orchestrator) -> None:
    agent = uuid.uuid4()
    newer = f.message(agent, seq=10, res=f.resources(memory_available_gb=4.0))
    older = f.message(agent, seq=9, res=f.resources(memory_available_gb=30.0))
    assert await orchestrator.receive(newer) == "applied"
    assert await orchestrator.receive(older) == "stale"
    assert await orchestrator.receive(newer) == "stale"  # a duplicate does nothing either
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent)
    assert row is not None and row.memory_available_gb == 4.0


async def test_restarted_agent_new_boot_is_accepted_by_its_send_time(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    started = clock.now()
    first = f.message(agent, boot_id=uuid.uuid4(), seq=500, sent_at=started)
    assert await orchestrator.receive(first) == "applied"
    clock.advance(30)
    after_restart = f.message(agent, boot_id=uuid.uuid4(), seq=1, sent_at=clock.now())
    assert await orchestrator.receive(after_restart) == "applied"
    late_from_old_run = f.message(agent, boot_id=first.boot_id, seq=501, sent_at=started)
    assert await orchestrator.receive(late_from_old_run) == "stale"


async def test_a_restart_with_a_corrected_clock_is_not_stale(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """A boot whose clock ran 240 s ahead, then a restart with the clock corrected: every
    beat of the new boot is applied (it was `stale` until real time caught up, and the agent
    went offline while beating every 5 s)."""
    agent = uuid.uuid4()
    ahead = f.message(agent, boot_id=uuid.uuid4(), seq=1, sent_at=f.later(clock.now(), 240))
    assert await orchestrator.receive(ahead) == "applied"
    corrected = uuid.uuid4()
    for seq in range(1, 14):  # 65 s of beats every 5 s
        clock.advance(5)
        beat = f.message(agent, boot_id=corrected, seq=seq, sent_at=clock.now())
        assert await orchestrator.receive(beat) == "applied", seq
    # a late goodbye of the old boot, sent before the restart, stays stale
    late_bye = f.message(agent, kind="offline", boot_id=ahead.boot_id, seq=2, sent_at=ahead.sent_at)
    assert await orchestrator.receive(late_bye) == "stale"


async def test_goodbye_marks_offline_at_once_and_is_recorded(
    orchestrator: Orchestrator,
) -> None:
    agent = uuid.uuid4()
    await orchestrator.receive(f.message(agent, seq=1))
    assert await orchestrator.receive(f.message(agent, kind="offline", seq=2)) == "applied"
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent)
        events = await registry.list_events(s, agent_id=agent)
    assert row is not None and row.status == "offline"
    assert events[0].reason == "goodbye" and events[0].to_status == "offline"
    # and a fresh heartbeat brings it back
    await orchestrator.receive(f.message(agent, seq=3))
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent)
    assert row is not None and row.status == "online"


async def test_goodbye_from_an_unknown_agent_registers_nothing(
    orchestrator: Orchestrator,
) -> None:
    msg = f.message(kind="offline")
    assert await orchestrator.receive(msg) == "unknown_agent"
    async with orchestrator.sessions() as s:
        assert await registry.get_agent(s, agent_id=msg.agent_id) is None


async def test_many_concurrent_heartbeats_are_applied_in_few_transactions(
    orchestrator: Orchestrator,
) -> None:
    msgs = [f.message(name=f"d{i}") for i in range(300)]
    outcomes = await asyncio.gather(*(orchestrator.receive(m) for m in msgs))
    assert outcomes == ["applied"] * 300
    batches = orchestrator.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count <= 3, f"300 heartbeats took {count} transactions"
    async with orchestrator.sessions() as s:
        assert (await registry.count_by_status(s)) == {"online": 300}


def batch_sizes(metrics: OrchestratorMetrics) -> tuple[float, float]:
    """(transactions, messages) the batcher has committed so far."""
    samples = metrics.batch_size.collect()[0].samples
    count = next(s.value for s in samples if s.name.endswith("_count"))
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    return count, total


async def test_a_batch_waits_for_stragglers_but_not_once_it_is_full(
    orchestrator: Orchestrator,
) -> None:
    metrics = OrchestratorMetrics()
    batcher = IngestBatcher(orchestrator.sessions, metrics, max_batch=4, max_delay_seconds=1.0)
    batcher.start()
    try:
        first = batcher.submit_nowait(Received(f.message(), orchestrator.clock.now()))
        await asyncio.sleep(0.05)  # arrives within the delay: same transaction
        second = batcher.submit_nowait(Received(f.message(), orchestrator.clock.now()))
        assert await asyncio.gather(first, second) == ["applied", "applied"]
        assert batch_sizes(metrics) == (1, 2)

        slow = IngestBatcher(orchestrator.sessions, metrics, max_batch=4, max_delay_seconds=60)
        slow.start()
        try:
            futures = []
            for _ in range(4):  # the fourth fills the batch: no minute's wait
                futures.append(slow.submit_nowait(Received(f.message(), orchestrator.clock.now())))
                await asyncio.sleep(0.01)
            async with asyncio.timeout(20):
                assert await asyncio.gather(*futures) == ["applied"] * 4
            assert batch_sizes(metrics) == (2, 6)
        finally:
            await slow.stop()
    finally:
        await batcher.stop()


async def test_same_agent_twice_in_one_batch_keeps_the_newest(
    orchestrator: Orchestrator,
) -> None:
    agent = uuid.uuid4()
    newer = f.message(agent, seq=2, res=f.resources(load_1min=7.0))
    older = f.message(agent, seq=1, res=f.resources(load_1min=0.5))
    bye = f.message(agent, kind="offline", seq=3)
    assert await asyncio.gather(
        orchestrator.receive(newer), orchestrator.receive(older), orchestrator.receive(bye)
    ) == ["applied", "stale", "applied"]
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent)
    assert row is not None and (row.status, row.cpu_load_1min) == ("offline", 7.0)


async def test_every_column_of_an_upsert_reads_back_as_written(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    # On PostgreSQL the batch travels as one JSON document (jsonb_to_recordset): UUIDs,
    # aware datetimes, NULLs, nested JSON and odd text must survive that trip unchanged.
    labels = {"room": "b12", "ünï": 'ç\'ode \\ "x"'}
    first = f.message(name='desk "β" \\ 1').model_copy(update={"labels": labels})
    later = f.message(
        first.agent_id,
        seq=first.seq + 1,
        sent_at=f.later(clock.now(), 3),  # received at +5: kept as sent
        name="desk-renamed",
        res=f.resources(gpus_free_total=[(7.5, 8.0), (0.25, 24.0)]),
    ).model_copy(update={"labels": labels})
    blank = f.message(res=Resources(probe_errors={"cpu": "psutil failed"}))
    assert await orchestrator.receive(first) == "applied"
    clock.advance(5)
    for msg in (later, blank):
        assert await orchestrator.receive(msg) == "applied"
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=later.agent_id)
        none = await registry.get_agent(s, agent_id=blank.agent_id)
    assert row is not None and later.resources is not None
    assert (row.name, row.labels, row.last_boot_id, row.last_seq) == (
        "desk-renamed",
        labels,
        later.boot_id,
        later.seq,
    )
    assert (row.last_sent_at, row.last_heartbeat_at) == (later.sent_at, clock.now())
    assert row.created_at == f.later(clock.now(), -5)  # kept from the first write
    assert row.resource_metrics == later.resources.model_dump(mode="json")
    assert (row.gpu_count, row.gpu_vram_total_gb, row.gpu_vram_available_max_gb) == (2, 32.0, 7.5)
    assert none is not None and none.resource_metrics["probe_errors"] == {"cpu": "psutil failed"}
    assert (none.cpu_load_1min, none.memory_available_gb, none.gpu_vram_available_gb) == (
        None,
        None,
        None,
    )
