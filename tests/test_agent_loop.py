"""The heartbeat loop end to end: AgentLoop -> in-memory transport -> the real orchestrator."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

from chiffon.agent.bounded import in_daemon_thread
from chiffon.agent.identity import default_name, load_or_create_agent_id
from chiffon.agent.loop import AgentIdentity, AgentLoop, backoff_seconds, beat_deadline
from chiffon.agent.probes.collect import Collector, FirstAvailable
from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
from chiffon.agent.probes.nvml import NvmlProbe
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.ingest import Outcome
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import registry
from chiffon.schemas.heartbeat import Resources
from chiffon.transport.memory import InMemoryPublisher
from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import FakeGpu
from tests.services import eventually


def make_loop(
    state_dir: Path, publisher: InMemoryPublisher, *, interval: float = 0.1
) -> tuple[AgentLoop, Collector]:
    agent_id = load_or_create_agent_id(state_dir)
    identity = AgentIdentity(agent_id, default_name(agent_id, "desk"), labels={"room": "b12"})
    nvidia = FirstAvailable("nvidia", NvmlProbe(fake_pynvml), NvidiaSmiProbe(timeout_seconds=1))
    collector = Collector([nvidia], timeout_seconds=1)
    loop = AgentLoop(
        identity,
        publisher,
        lambda: in_daemon_thread(collector.collect, name="test-collect"),
        interval_seconds=interval,
        publish_timeout_seconds=0.5,
    )
    return loop, collector


async def test_agent_registers_with_resources_keeps_its_id_and_says_goodbye(
    orchestrator: Orchestrator, tmp_path: Path, clock: ManualClock
) -> None:
    fake_pynvml.reset([FakeGpu(total_bytes=24 * 10**9, free_bytes=18 * 10**9)])
    first, _ = make_loop(tmp_path, InMemoryPublisher(orchestrator.ingest))
    await asyncio.wait_for(first.run(max_beats=3), 10)
    agent_id = first.identity.agent_id
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=agent_id)
        events = await registry.list_events(s, agent_id=agent_id)
    assert row is not None and row.status == "offline"  # the goodbye
    assert (row.gpu_count, row.gpu_vram_available_gb, row.labels) == (1, 18.0, {"room": "b12"})
    assert row.resource_metrics["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert row.name == f"desk-{str(agent_id)[:8]}" and first.delivered == 3
    assert [e.reason for e in events][::-1] == ["registered", "goodbye"]

    clock.advance(5)  # the restart, a little later (a send time counts up to its receipt)
    second, _ = make_loop(tmp_path, InMemoryPublisher(orchestrator.ingest))
    assert second.identity.agent_id == agent_id and second.boot_id != first.boot_id
    await asyncio.wait_for(second.run(max_beats=1), 10)
    async with orchestrator.sessions() as s:
        events = await registry.list_events(s, agent_id=agent_id)
        agents = await registry.list_agents(s)
    assert [e.reason for e in events][::-1] == ["registered", "goodbye", "heartbeat", "goodbye"]
    assert [a.agent_id for a in agents] == [agent_id]  # a restart is the same agent


async def test_outage_is_retried_with_the_newest_snapshot(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    fake_pynvml.reset([FakeGpu()])
    refusals = 4

    async def flaky(raw: bytes) -> Outcome:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise ConnectionError("orchestrator down")
        return await orchestrator.ingest(raw)

    loop, _ = make_loop(tmp_path, InMemoryPublisher(flaky), interval=0.1)
    await asyncio.wait_for(loop.run(max_beats=3), 10)
    assert loop.failures == 4 and loop.delivered >= 1
    async with orchestrator.sessions() as s:
        row = await registry.get_agent(s, agent_id=loop.identity.agent_id)
    assert row is not None and row.last_seq is not None and row.last_seq >= 4


async def test_hung_transport_never_stalls_collection_and_stop_is_prompt(tmp_path: Path) -> None:
    fake_pynvml.reset([FakeGpu()])
    never, eight_collected = asyncio.Event(), asyncio.Event()
    collected = 0

    async def black_hole(raw: bytes) -> Outcome:
        await never.wait()
        return "applied"

    loop, collector = make_loop(tmp_path, InMemoryPublisher(black_hole), interval=0.05)
    inner = loop._collect

    async def counting() -> Resources:
        nonlocal collected
        collected += 1
        if collected == 8:
            eight_collected.set()
        return await inner()

    loop._collect = counting
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(eight_collected.wait(), 10)  # beats go on while publishing hangs
    assert loop.delivered == 0
    started = time.monotonic()
    loop.stop()
    await asyncio.wait_for(task, 3)
    assert time.monotonic() - started < 2.0
    collector.close()


def test_schedule_has_jitter_but_no_drift() -> None:
    rng = random.Random(7)
    deadlines = [beat_deadline(100.0, k, 15.0, rng) for k in range(2000)]
    assert deadlines[0] == 100.0  # the first beat is the registration, at once
    offsets = [d - 100.0 - 15.0 * k for k, d in enumerate(deadlines)]
    assert max(abs(o) for o in offsets) <= 1.5  # ±10% of the interval, even at beat 2000
    assert len({round(o, 3) for o in offsets[1:]}) > 1000  # agents do not beat in lockstep
    assert all(b - a >= 15.0 * 0.8 for a, b in itertools.pairwise(deadlines))


def test_backoff_grows_and_is_capped_at_the_interval() -> None:
    rng = random.Random(1)
    ceilings = [max(backoff_seconds(n, 15.0, rng) for _ in range(200)) for n in (1, 2, 3, 6, 9)]
    assert ceilings[0] <= 0.5 < ceilings[2] <= 2.0
    assert 7.5 < ceilings[3] <= 15.0 and ceilings[4] <= 15.0


async def test_unreachable_publisher_at_stop_still_exits(tmp_path: Path) -> None:
    publisher = InMemoryPublisher(lambda raw: asyncio.sleep(10, "applied"))  # type: ignore[arg-type, return-value]
    loop, _ = make_loop(tmp_path, publisher)
    loop.stop()
    started = time.monotonic()
    await loop.run()
    assert time.monotonic() - started < 2.0
    assert publisher.sent == 0  # the goodbye never arrived, and that did not hold us up


async def test_a_nudge_sends_a_heartbeat_at_once_saying_whether_jobs_are_welcome(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    """The owner came back: the orchestrator hears `accepts_jobs: false` now, not at the
    next beat (here an hour away)."""
    fake_pynvml.reset([])
    welcome = [True]
    agent_id = load_or_create_agent_id(tmp_path)
    collector = Collector([], timeout_seconds=1)
    loop = AgentLoop(
        AgentIdentity(agent_id, "desk"), InMemoryPublisher(orchestrator.ingest),
        lambda: in_daemon_thread(collector.collect, name="test-collect"),
        interval_seconds=3600, accepts_jobs=lambda: welcome[0],
    )  # fmt: skip
    running = asyncio.create_task(loop.run())

    async def accepts() -> bool | None:
        async with orchestrator.sessions() as s:
            row = await registry.get_agent(s, agent_id=agent_id)
        return None if row is None else row.accepts_jobs

    async def registered() -> bool:
        return await accepts() is True

    async def refused() -> bool:
        return await accepts() is False

    await eventually(registered)  # the first beat, at once
    welcome[0] = False
    loop.nudge()
    await eventually(refused, within_seconds=5)  # without the nudge: in an hour
    assert loop.delivered == 2
    loop.stop()
    await asyncio.wait_for(running, 5)
