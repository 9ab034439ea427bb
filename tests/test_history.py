"""Metrics history on both engines: tiers written by ingest, read by the API, pruned."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest
from sqlalchemy import func, select

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.history import HistoryRecorder
from chiffon.orchestrator.ingest import Received, apply_batch
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import AgentMetricsRow
from tests import factories as f
from tests.auth import API_HEADERS

AGENT = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


@pytest.fixture
async def api(orchestrator: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(orchestrator, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://chiffon", headers=API_HEADERS
    ) as client:
        yield client


async def beat(orchestrator: Orchestrator, free_gb: float, *, agent: uuid.UUID = AGENT) -> None:
    res = f.resources(gpus_free_total=[(free_gb, 24.0), (1.0, 8.0)], load_1min=free_gb / 10)
    assert await orchestrator.receive(f.message(agent, res=res)) == "applied"


async def beat_every_15s(orchestrator: Orchestrator, clock: ManualClock, count: int) -> None:
    """`count` heartbeats 15 s apart; the i-th reports i GB free on GPU 0."""
    for i in range(count):
        await beat(orchestrator, float(i))
        clock.advance(15)


async def tier_counts(orchestrator: Orchestrator) -> dict[int, int]:
    stmt = select(AgentMetricsRow.resolution_seconds, func.count()).group_by(
        AgentMetricsRow.resolution_seconds
    )
    async with orchestrator.sessions() as s:
        return {int(r[0]): int(r[1]) for r in await s.execute(stmt)}


def iso(at: datetime) -> str:
    return at.isoformat()


async def test_every_heartbeat_for_an_hour_then_one_point_per_minute_and_quarter(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    # ManualClock starts on a quarter hour: 8 beats 15 s apart span minutes 0 and 1.
    await beat_every_15s(orchestrator, clock, 8)
    assert await tier_counts(orchestrator) == {0: 8, 60: 2, 900: 1}
    async with orchestrator.sessions() as s:
        rows = (
            await s.scalars(
                select(AgentMetricsRow)
                .where(AgentMetricsRow.resolution_seconds == 60)
                .order_by(AgentMetricsRow.bucket_start)
            )
        ).all()
    # First value wins: minute 0 starts with the 1st beat (0 GB), minute 1 with the 5th (4 GB).
    assert [r.gpus[0]["vram_free_gb"] for r in rows] == [0.0, 4.0]
    assert rows[1].gpu_vram_available_gb == 5.0 and rows[1].cpu_load_1min == 0.4


async def test_a_bucket_keeps_its_first_heartbeat_across_batches_and_orchestrators(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    tiers = orchestrator.settings.history_tiers
    mine, other = HistoryRecorder(tiers), HistoryRecorder(tiers)
    first = f.message(AGENT, seq=1, res=f.resources(memory_available_gb=10.0))
    second = f.message(AGENT, seq=2, res=f.resources(memory_available_gb=12.0))
    async with orchestrator.sessions.begin() as s:  # two beats at once in one batch
        items = [Received(first, clock.now()), Received(second, clock.now())]
        assert await apply_batch(s, items, history=mine) == ["applied", "applied"]
    mine.committed()
    clock.advance(15)
    third = f.message(AGENT, seq=3, res=f.resources(memory_available_gb=14.0))
    assert [r["resolution_seconds"] for r in mine.rows([(third, clock.now())])] == [0]
    async with orchestrator.sessions.begin() as s:  # another orchestrator, same buckets
        await apply_batch(s, [Received(third, clock.now())], history=other)
    async with orchestrator.sessions() as s:
        rows = (await s.scalars(select(AgentMetricsRow))).all()
    assert sorted((r.resolution_seconds, r.memory_available_gb) for r in rows) == [
        (0, 10.0),
        (0, 14.0),
        (60, 10.0),
        (900, 10.0),
    ]


async def test_api_reads_the_finest_tier_covering_the_window_one_point_per_step(
    orchestrator: Orchestrator, clock: ManualClock, api: httpx.AsyncClient
) -> None:
    start = clock.now()
    await beat_every_15s(orchestrator, clock, 8)
    url = f"/api/v1/agents/{AGENT}/metrics"

    body = (await api.get(url, params={"since": iso(start)})).json()
    assert body["resolution_seconds"] == 0
    assert [p["gpus"][0]["vram_free_gb"] for p in body["points"]] == [float(i) for i in range(8)]
    assert body["points"][0]["gpus"][1] == {
        "index": 1,
        "vram_free_gb": 1.0,
        "vram_total_gb": 8.0,
        "utilization_percent": None,
    }

    per_minute = (await api.get(url, params={"since": iso(start), "step": 60})).json()
    assert per_minute["resolution_seconds"] == 60
    assert [p["gpu_vram_available_gb"] for p in per_minute["points"]] == [1.0, 5.0]

    clock.advance(2 * 3600)  # the raw tier no longer reaches back to `start`
    later = (await api.get(url, params={"since": iso(start), "step": 1})).json()
    assert later["resolution_seconds"] == 60 and len(later["points"]) == 2

    bad = await api.get(url, params={"since": iso(clock.now()), "until": iso(start)})
    assert bad.status_code == 400


async def test_pruning_deletes_each_tier_after_its_retention(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await beat_every_15s(orchestrator, clock, 8)
    clock.advance(3600)
    assert await orchestrator.pruner.prune_once() == {0: 8, 60: 0, 900: 0}
    assert await tier_counts(orchestrator) == {60: 2, 900: 1}
    clock.advance(86400)
    await orchestrator.pruner.prune_once()
    assert await tier_counts(orchestrator) == {900: 1}
    clock.advance(30 * 86400)
    await orchestrator.pruner.prune_once()
    assert await tier_counts(orchestrator) == {}


async def test_fleet_summary_counts_by_pool_and_sums_online_capacity(
    orchestrator: Orchestrator, clock: ManualClock, api: httpx.AsyncClient
) -> None:
    fleet = [
        ("a", [(20.0, 24.0), (4.0, 24.0)], 12),
        ("a", [(6.0, 8.0)], 4),
        ("b", [], 4),
    ]
    ids = []
    for pool, gpus, cores in fleet:
        msg = f.message(pool_name=pool, res=f.resources(gpus_free_total=gpus, cores_physical=cores))
        await orchestrator.receive(msg)
        ids.append(msg.agent_id)
    await orchestrator.ingest(f.raw(f.message(ids[1], kind="offline", pool_name="a")))
    body = (await api.get("/api/v1/fleet/summary")).json()
    pools = {p["pool_name"]: p for p in body["pools"]}
    assert (pools["a"]["agents_online"], pools["a"]["agents_offline"]) == (1, 1)
    assert (pools["a"]["gpu_vram_available_gb"], pools["a"]["gpu_vram_total_gb"]) == (24.0, 48.0)
    assert (pools["a"]["cpu_cores_available"], pools["a"]["cpu_cores_physical"]) == (11, 12)
    assert body["fleet"]["agents_online"] == 2 and body["fleet"]["agents_offline"] == 1
    assert body["fleet"]["cpu_cores_physical"] == 16


async def test_history_off_writes_nothing(orchestrator: Orchestrator, clock: ManualClock) -> None:
    async with orchestrator.sessions.begin() as s:
        recorder = HistoryRecorder([])
        await apply_batch(s, [Received(f.message(AGENT), clock.now())], history=recorder)
    assert await tier_counts(orchestrator) == {}


def test_retention_of_zero_turns_a_tier_off_and_history_can_be_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chiffon.orchestrator.settings import OrchestratorSettings

    monkeypatch.setenv("CHIFFON_HISTORY_RAW_RETENTION_SECONDS", "0")
    monkeypatch.setenv("CHIFFON_HISTORY_15M_RETENTION_SECONDS", "86400")
    tiers = OrchestratorSettings().history_tiers
    assert [(t.resolution_seconds, t.retention_seconds) for t in tiers] == [
        (60, 86400),
        (900, 86400),
    ]
    monkeypatch.setenv("CHIFFON_HISTORY_ENABLED", "false")
    assert OrchestratorSettings().history_tiers == []
