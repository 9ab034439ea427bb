"""Metrics history on both engines: tiers recorded from the registry, read by the API, pruned."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.history import TICK_MARGIN_SECONDS, HistoryRecorder
from chiffon.orchestrator.ingest import Received, apply_batch
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import AgentMetricsRow
from chiffon.schemas.metrics import HISTORY
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
    """`count` heartbeat intervals: a beat (the i-th reports i GB free), a recorder tick, 15 s."""
    for i in range(count):
        await beat(orchestrator, float(i))
        await orchestrator.recorder.record_once()
        clock.advance(15)


async def tier_counts(orchestrator: Orchestrator) -> dict[int, int]:
    stmt = select(AgentMetricsRow.resolution_seconds, func.count()).group_by(
        AgentMetricsRow.resolution_seconds
    )
    async with orchestrator.sessions() as s:
        return {int(r[0]): int(r[1]) for r in await s.execute(stmt)}


async def points(orchestrator: Orchestrator, resolution_seconds: int) -> list[AgentMetricsRow]:
    async with orchestrator.sessions() as s:
        stmt = (
            select(AgentMetricsRow)
            .where(AgentMetricsRow.resolution_seconds == resolution_seconds)
            .order_by(AgentMetricsRow.bucket_start, AgentMetricsRow.agent_id)
        )
        return list((await s.scalars(stmt)).all())


def iso(at: datetime) -> str:
    return at.isoformat()


async def test_ingest_writes_no_history(orchestrator: Orchestrator, clock: ManualClock) -> None:
    async with orchestrator.sessions.begin() as s:
        items = [Received(f.message(AGENT), clock.now()) for _ in range(3)]
        assert await apply_batch(s, items) == ["applied"] * 3
    for _ in range(3):
        await beat(orchestrator, 1.0)
    assert await tier_counts(orchestrator) == {}


async def test_every_heartbeat_interval_for_an_hour_then_one_point_per_minute_and_quarter(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    # ManualClock starts on a quarter hour: 8 intervals of 15 s span minutes 0 and 1.
    await beat_every_15s(orchestrator, clock, 8)
    assert await tier_counts(orchestrator) == {0: 8, 60: 2, 900: 1}
    minutes = await points(orchestrator, 60)
    # Sampled at the boundary: minute 0 holds the 1st beat (0 GB), minute 1 the 5th (4 GB).
    assert [r.gpus[0]["vram_free_gb"] for r in minutes] == [0.0, 4.0]
    assert minutes[1].gpu_vram_available_gb == 5.0 and minutes[1].cpu_load_1min == 0.4
    assert minutes[1].memory_total_gb == 32.0
    assert minutes[1].gpus[1] == {
        "index": 1,
        "vram_free_gb": 1.0,
        "vram_total_gb": 8.0,
        "utilization_percent": None,
    }
    raw = await points(orchestrator, 0)
    assert [r.bucket_start for r in raw] == [
        minutes[0].bucket_start + timedelta(seconds=15 * i) for i in range(8)
    ]
    assert all(r.sampled_at == r.bucket_start for r in raw)  # each beat came at a boundary


async def test_one_point_per_interval_whatever_the_heartbeat_rate(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    for second in range(15):  # an agent beating every second: still one point per 15 s
        await beat(orchestrator, float(second))
        await orchestrator.recorder.record_once()
        clock.advance(1)
    await beat(orchestrator, 20.0)
    assert await orchestrator.recorder.record_once() == {0: 1}  # a new 15 s bucket only
    assert [r.gpus[0]["vram_free_gb"] for r in await points(orchestrator, 0)] == [0.0, 20.0]
    assert await tier_counts(orchestrator) == {0: 2, 60: 1, 900: 1}


async def test_only_agents_online_and_recently_heard_are_recorded(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    gone, silent, alive = (uuid.UUID(int=n) for n in (1, 2, 3))
    for agent in (gone, silent, alive):
        await beat(orchestrator, 3.0, agent=agent)
    assert await orchestrator.receive(f.message(gone, kind="offline")) == "applied"
    clock.advance(60)  # longer than the 45 s timeout, not yet swept: `silent` is still online
    await beat(orchestrator, 4.0, agent=alive)
    assert await orchestrator.recorder.record_once() == {0: 1, 60: 1, 900: 1}
    assert {r.agent_id for r in await points(orchestrator, 0)} == {alive}


async def test_replicas_record_each_bucket_once_and_a_failed_tick_is_retried(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await beat(orchestrator, 7.0)
    tiers = orchestrator.settings.history_tiers
    other = HistoryRecorder(
        orchestrator.sessions, clock, orchestrator.metrics, tiers, heard_within_seconds=45
    )
    assert await orchestrator.recorder.record_once() == {0: 1, 60: 1, 900: 1}
    assert await orchestrator.recorder.record_once() == {}  # same buckets: no round trip
    assert await other.record_once() == {0: 0, 60: 0, 900: 0}  # the database said no
    assert await tier_counts(orchestrator) == {0: 1, 60: 1, 900: 1}

    empty = create_async_engine("sqlite+aiosqlite:///:memory:")
    broken = HistoryRecorder(
        async_sessionmaker(empty), clock, orchestrator.metrics, tiers, heard_within_seconds=45
    )
    try:
        with pytest.raises(DBAPIError):  # no tables: the tick fails
            await broken.record_once()
    finally:
        await empty.dispose()
    assert len(broken.due(clock.now())) == 3  # nothing marked as done: the next tick retries


async def test_a_tick_is_one_statement_per_tier_due_whatever_the_fleet_size(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    for n in range(50):
        await beat(orchestrator, 2.0, agent=uuid.UUID(int=1000 + n))
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(orchestrator.engine.sync_engine, "before_cursor_execute", count)
    try:
        assert await orchestrator.recorder.record_once() == {0: 50, 60: 50, 900: 50}
        clock.advance(15)
        assert await orchestrator.recorder.record_once() == {0: 50}
    finally:
        event.remove(orchestrator.engine.sync_engine, "before_cursor_execute", count)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 4


def test_the_recorder_wakes_at_the_next_boundary_of_the_heartbeat_interval() -> None:
    from chiffon.orchestrator.metrics import OrchestratorMetrics
    from chiffon.orchestrator.settings import OrchestratorSettings

    clock = ManualClock()
    fast = OrchestratorSettings(heartbeat_interval_seconds=1, heartbeat_timeout_seconds=3)
    recorder = HistoryRecorder(
        async_sessionmaker(),
        clock,
        OrchestratorMetrics(),
        fast.history_tiers,
        heard_within_seconds=3,
    )
    clock.advance(0.25)
    assert recorder.seconds_to_next_tick() == pytest.approx(0.75 + TICK_MARGIN_SECONDS)
    default = OrchestratorSettings()
    assert [t.every_seconds for t in default.history_tiers] == [15, 60, 900]


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

    hour_late = await api.get(url, params={"since": iso(clock.now() - timedelta(seconds=3601))})
    assert hour_late.json()["resolution_seconds"] == 0  # "the last hour", asked a second late

    clock.advance(2 * 3600)  # the raw tier no longer reaches back to `start`
    later = (await api.get(url, params={"since": iso(start), "step": 1})).json()
    assert later["resolution_seconds"] == 60 and len(later["points"]) == 2

    # An empty window (since after until) is an empty answer, not an error: every pair of
    # valid times is a valid question, as the OpenAPI document says.
    empty = await api.get(url, params={"since": iso(clock.now()), "until": iso(start)})
    assert empty.status_code == 200 and empty.json()["points"] == []
    # At most 400 days are read: an older `since` starts 400 days before `until`.
    ancient = await api.get(url, params={"since": iso(clock.now() - timedelta(days=1000))})
    assert ancient.status_code == 200
    since = datetime.fromisoformat(ancient.json()["since"])
    assert since == clock.now() - timedelta(days=400)


async def test_each_history_metric_is_written_to_its_own_column(
    orchestrator: Orchestrator, clock: ManualClock, api: httpx.AsyncClient
) -> None:
    """Every number a point keeps is the heartbeat's own: a distinct value per metric, so a
    select and an insert that paired two columns wrongly would show here."""
    res = f.resources(
        gpus_free_total=[(3.0, 8.0)], cores_physical=7, load_1min=2.5,
        memory_available_gb=11.0, memory_total_gb=31.0,
    )  # fmt: skip
    assert await orchestrator.receive(f.message(AGENT, res=res)) == "applied"
    await orchestrator.recorder.record_once()
    body = (await api.get(f"/api/v1/agents/{AGENT}/metrics")).json()
    [point] = body["points"]
    sent = {m.name: m.value(res) for m in HISTORY}
    assert len(set(sent.values())) == len(sent)  # the check means something only if distinct
    assert {name: point[name] for name in sent} == sent


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


async def test_history_off_records_nothing(database_url: str, tmp_path: Path) -> None:
    from chiffon.orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings(
        database_url=database_url, data_dir=tmp_path, history_enabled=False
    )
    orch = Orchestrator(settings, clock=ManualClock())
    try:
        await orch.start()  # with its periodic tasks: no recorder, no pruner
        listeners = {"chiffon-credential-changes", "chiffon-queue-notices",
                     "chiffon-log-notices", "chiffon-order-notices"}  # fmt: skip
        names = {t.get_name() for t in orch._tasks} - listeners
        assert names == {
            "chiffon-sweep",
            "chiffon-dispatch",
            "chiffon-log-prune",
            "chiffon-blob-collect",
        }
        assert await orch.recorder.record_once() == {}
    finally:
        await orch.stop()
