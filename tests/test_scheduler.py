"""The scheduler's pass on both engines: claims written where the job is placed, free
capacity net of claims, the reason a job waits, backfill and the starvation guard, and no
double-booking between two orchestrators on one PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from chiffon.orchestrator import jobs, placement
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import FleetCache, PassResult, schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import AgentRow, JobClaimRow, JobEventRow, JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.heartbeat import Sandbox
from chiffon.schemas.jobs import JobSubmit
from tests import factories as f
from tests.jobfleet import desktop


async def submit(orch: Orchestrator, clock: ManualClock, **requirements: object) -> uuid.UUID:
    spec = JobSubmit.model_validate({"command": ["true"], "requirements": requirements})
    job_id = uuid.uuid4()
    async with orch.sessions.begin() as s:
        await repo.add_job(s, job_id=job_id, name=None, spec=spec.model_dump(), now=clock.now())
    clock.advance(0.001)  # submission order is time order
    return job_id


async def one_pass(orch: Orchestrator, clock: ManualClock, **kwargs: object) -> PassResult:
    return await schedule_once(orch.sessions, now=clock.now(), **kwargs)  # type: ignore[arg-type]


async def claims(orch: Orchestrator) -> dict[str, float]:
    """VRAM claimed per GPU."""
    async with orch.sessions() as s:
        rows = (await s.scalars(select(JobClaimRow))).all()
    total: dict[str, float] = defaultdict(float)
    for c in rows:
        if c.vram_gb is not None:
            total[c.resource] += c.vram_gb
    return dict(total)


async def job(orch: Orchestrator, job_id: uuid.UUID) -> JobRow:
    async with orch.sessions() as s:
        row = await s.get(JobRow, job_id)
    assert row is not None
    return row


async def test_a_job_is_placed_best_fit_and_its_claim_is_written_with_it(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    big = await desktop(orchestrator, "big", (48.0, 48.0))
    await desktop(orchestrator, "small", (12.0, 12.0))
    await desktop(orchestrator, "private", (12.0, 12.0), accepts=False)
    first = await submit(orchestrator, clock, gpus=1, vram_gb=8, cpu_cores=2)
    second = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    result = await one_pass(orchestrator, clock)
    # the tight GPU for the first; the second no longer fits there (4 GB left): the big one
    assert [p.gpu_uuids for p in result.placed.values()] == [("GPU-small-0",), ("GPU-big-0",)]
    assert await claims(orchestrator) == {"gpu:GPU-small-0": 8.0, "gpu:GPU-big-0": 8.0}
    placed = await job(orchestrator, second)
    assert (placed.state, placed.attempt, placed.agent_id) == ("assigned", 1, big)
    async with orchestrator.sessions() as s:
        events = (await s.scalars(select(JobEventRow).where(JobEventRow.job_id == first))).all()
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "queued"),
        ("queued", "assigned"),
    ]


async def test_a_job_that_does_not_fit_waits_with_the_nearest_miss_then_is_placed(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "render-02", (6.1, 8.0))
    waiting = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    result = await one_pass(orchestrator, clock)
    assert result.waiting[waiting] == (
        "no online agent that accepts jobs has 1 GPU with 8 GB free: "
        "closest is render-02 GPU 0 with 6.1 GB"
    )
    assert (await job(orchestrator, waiting)).reason == result.waiting[waiting]
    # the game on that GPU quits: the next heartbeat shows the memory free
    res = f.resources(gpus_free_total=[(8.0, 8.0)], load_1min=0.0)
    named = [g.model_copy(update={"uuid": "GPU-render-02-0"}) for g in res.gpus]
    beat = f.message(agent, name="render-02", res=res.model_copy(update={"gpus": named}))
    await orchestrator.receive(beat.model_copy(update={"accepts_jobs": True}))
    assert waiting in (await one_pass(orchestrator, clock)).placed


async def test_claims_count_until_the_attempt_ends(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "one", (24.0, 24.0))
    ids = [await submit(orchestrator, clock, gpus=1, vram_gb=10) for _ in range(3)]
    assert list((await one_pass(orchestrator, clock)).placed) == ids[:2]  # 20 of 24 GB
    async with orchestrator.sessions.begin() as s:  # the first attempt ends: claims go
        await s.execute(delete(JobClaimRow).where(JobClaimRow.job_id == ids[0]))
    assert list((await one_pass(orchestrator, clock)).placed) == [ids[2]]


async def test_small_jobs_pass_a_blocked_one_until_it_has_waited_too_long(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "a", (10.0, 24.0))  # 14 GB held by something else
    large = await submit(orchestrator, clock, gpus=1, vram_gb=20)
    small = await submit(orchestrator, clock, gpus=1, vram_gb=2)
    result = await one_pass(orchestrator, clock, starvation_seconds=300)
    assert small in result.placed and large in result.waiting  # backfill
    clock.advance(301)
    later = await submit(orchestrator, clock, gpus=1, vram_gb=2)
    result = await one_pass(orchestrator, clock, starvation_seconds=300)
    assert large in result.waiting and later in result.waiting  # a reserves for the large
    assert "no online agent" in result.waiting[later]


async def test_nothing_is_placed_on_agents_offline_or_not_accepting_jobs(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "private", (24.0, 24.0), accepts=False)
    gone = await desktop(orchestrator, "gone", (24.0, 24.0))
    await orchestrator.receive(f.message(gone, kind="offline"))
    waiting = await submit(orchestrator, clock, gpus=1, vram_gb=1)
    result = await one_pass(orchestrator, clock)
    assert result.waiting[waiting] == (
        "no online agent that accepts jobs has 1 GPU with 1 GB free; "
        "1 agent offline; 1 does not accept jobs"
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_orchestrators_never_claim_the_same_gpu_memory_twice(
    orchestrator: Orchestrator, clock: ManualClock, database_url: str
) -> None:
    """200 jobs at once, two schedulers on their own engines passing concurrently over
    three agents with two 24 GB GPUs each: 6 jobs of 4 GB fit on each GPU, 36 in all."""
    for name in ("a", "b", "c"):
        await desktop(orchestrator, name, (24.0, 24.0), (24.0, 24.0), cores=64)
    ids = [await submit(orchestrator, clock, gpus=1, vram_gb=4) for _ in range(200)]
    engines = [create_async_engine(database_url) for _ in range(2)]
    makers = [async_sessionmaker(e, expire_on_commit=False) for e in engines]

    async def passes(sessions: async_sessionmaker) -> None:  # type: ignore[type-arg]
        for _ in range(6):
            await schedule_once(sessions, now=clock.now(), limit=40)

    try:
        await asyncio.gather(*(passes(m) for m in makers))
    finally:
        for e in engines:
            await e.dispose()
    per_gpu = await claims(orchestrator)
    assert len(per_gpu) == 6 and all(gb <= 24.0 for gb in per_gpu.values()), per_gpu
    states = [(await job(orchestrator, i)) for i in ids]
    assigned = [j for j in states if j.state == "assigned"]
    assert len(assigned) == 36 and all(j.attempt == 1 for j in assigned)  # each once
    assert sum(per_gpu.values()) == 36 * 4.0


async def test_a_choice_that_no_longer_fits_under_the_lock_is_chosen_again(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the pass's read and the batch's locks, another orchestrator claims 6 of
    the tight GPU's 10 GB: the job chosen for it (8 GB) is not written there, but placed on
    the roomy one, and the batch's other job keeps its place."""
    small = await desktop(orchestrator, "small", (10.0, 10.0))
    await desktop(orchestrator, "big", (24.0, 24.0))
    first = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    second = await submit(orchestrator, clock, gpus=1, vram_gb=1, cpu_cores=0)
    rival = await submit(orchestrator, clock, gpus=1, vram_gb=6)  # beyond this pass's limit
    take_many = repo.take_queued_many

    async def meanwhile(session, *, job_ids):  # type: ignore[no-untyped-def]
        async with orchestrator.sessions.begin() as other:
            job_row = await other.get(JobRow, rival)
            assert job_row is not None
            repo.assign(other, job=job_row, agent_id=small, gpus=[("GPU-small-0", 6.0)],
                        cpu_cores=0, memory_gb=0, now=clock.now())  # fmt: skip
        monkeypatch.setattr(repo, "take_queued_many", take_many)
        return await take_many(session, job_ids=job_ids)

    monkeypatch.setattr(repo, "take_queued_many", meanwhile)
    result = await one_pass(orchestrator, clock, limit=2)
    assert set(result.placed) == {first, second}
    assert result.placed[first].gpu_uuids == ("GPU-big-0",)
    per_gpu = await claims(orchestrator)
    assert per_gpu == {"gpu:GPU-small-0": 6.0 + 1.0, "gpu:GPU-big-0": 8.0}, per_gpu
    assert (await job(orchestrator, first)).attempt == 1


async def test_only_another_schedulers_claims_move_a_scheduler_to_a_lane(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A choice can fail because the desktop itself reported less room (a heartbeat): that
    is no reason to give up best fit. Claims written by someone else are."""
    small = await desktop(orchestrator, "small", (10.0, 10.0))
    await desktop(orchestrator, "big", (24.0, 24.0))
    take_many = repo.take_queued_many
    cache = FleetCache()

    async def heartbeat_took_the_room(session, *, job_ids):  # type: ignore[no-untyped-def]
        async with orchestrator.sessions.begin() as other:
            row = await other.get(AgentRow, small)
            assert row is not None
            gpus = [{**g, "vram_free_gb": 2.0} for g in row.resource_metrics["gpus"]]
            row.resource_metrics = {**row.resource_metrics, "gpus": gpus}
        monkeypatch.setattr(repo, "take_queued_many", take_many)
        return await take_many(session, job_ids=job_ids)

    job_id = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    monkeypatch.setattr(repo, "take_queued_many", heartbeat_took_the_room)
    placed = (await one_pass(orchestrator, clock, cache=cache)).placed
    assert placed[job_id].gpu_uuids == ("GPU-big-0",) and cache.lane is None
    mine = await submit(orchestrator, clock, gpus=1, vram_gb=10)  # only "big" has room
    rival = await submit(orchestrator, clock, gpus=1, vram_gb=15)  # beyond this pass's limit

    async def another_scheduler_placed(session, *, job_ids):  # type: ignore[no-untyped-def]
        async with orchestrator.sessions.begin() as other:
            row = await other.get(JobRow, rival)
            assert row is not None
            big = (await job(orchestrator, job_id)).agent_id
            assert big is not None
            repo.assign(other, job=row, agent_id=big, gpus=[("GPU-big-0", 15.0)], cpu_cores=0,
                        memory_gb=0, now=clock.now())  # fmt: skip
        monkeypatch.setattr(repo, "take_queued_many", take_many)
        return await take_many(session, job_ids=job_ids)

    monkeypatch.setattr(repo, "take_queued_many", another_scheduler_placed)
    result = await one_pass(orchestrator, clock, cache=cache, limit=1)
    assert mine not in result.placed and cache.lane is not None, result


async def test_a_pass_with_nothing_queued_reads_nothing_else(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "a", (24.0, 24.0))
    assert await one_pass(orchestrator, clock) == PassResult()
    clock.advance(timedelta(seconds=1).total_seconds())


async def test_a_kept_fleet_sees_what_changed_between_passes(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """The Dispatcher's FleetCache reads again only what changed: an attempt that ended
    (its claim freed) and an agent that registered are seen by the next pass, long before
    the whole fleet is read again."""
    one = await desktop(orchestrator, "one", (24.0, 24.0))
    cache = FleetCache(full_read_seconds=3600)
    ids = [await submit(orchestrator, clock, gpus=1, vram_gb=10) for _ in range(3)]
    assert list((await one_pass(orchestrator, clock, cache=cache)).placed) == ids[:2]
    ended = Report("ended", "exit", exit_code=0)
    verdict = await jobs.report(orchestrator.sessions, agent_id=one, job_id=ids[0], attempt=1,
                                said=ended, now=clock.now())  # fmt: skip
    assert verdict == "applied"
    assert list((await one_pass(orchestrator, clock, cache=cache)).placed) == [ids[2]]
    await desktop(orchestrator, "two", (24.0, 24.0))
    big = await submit(orchestrator, clock, gpus=1, vram_gb=20)
    placed = (await one_pass(orchestrator, clock, cache=cache)).placed
    assert placed[big].gpu_uuids == ("GPU-two-0",)


async def test_a_kept_fleet_reads_each_change_once_not_at_every_pass_that_follows(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes are looked for from a margin (5 s) before the last pass; an agent whose
    latest change was read already is not read again at each pass within it."""
    reads: list[set[uuid.UUID]] = []
    read = FleetCache._read

    async def counted(session: object, fleet: object, agent_ids: set[uuid.UUID]) -> None:
        reads.append(set(agent_ids))
        await read(session, fleet, agent_ids)  # type: ignore[arg-type]

    monkeypatch.setattr(FleetCache, "_read", staticmethod(counted))
    a = await desktop(orchestrator, "a", (24.0, 24.0))
    b = await desktop(orchestrator, "b", (24.0, 24.0))
    await submit(orchestrator, clock, gpus=1, vram_gb=100)  # waits: the passes read the fleet
    cache = FleetCache(full_read_seconds=3600)

    async def next_pass() -> set[uuid.UUID]:
        clock.advance(1)
        before = len(reads)
        await one_pass(orchestrator, clock, cache=cache)
        return set().union(*reads[before:])

    await next_pass()  # the whole fleet
    assert await next_pass() == {a, b}  # registered since the margin began: not yet known
    assert await next_pass() == set()  # nothing new: read nothing again
    await desktop(orchestrator, "b", (20.0, 24.0), agent=b)  # b's next heartbeat
    assert await next_pass() == {b}
    assert await next_pass() == set()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_agent_another_placement_holds_is_skipped_not_waited_for(
    orchestrator: Orchestrator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another orchestrator is placing on the tightest agent (it holds that agent's
    placement lock): the job goes to the next best agent at once, and the held one is
    left alone for the rest of the pass."""
    monkeypatch.setattr(placement, "_lane_of", lambda _agent_id: 0)  # lanes change nothing
    small = await desktop(orchestrator, "small", (10.0, 10.0))
    await desktop(orchestrator, "big", (24.0, 24.0))
    first = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    async with orchestrator.sessions.begin() as other:
        assert [r.agent_id for r in await repo.lock_agents(other, agent_ids=[small])] == [small]
        result = await asyncio.wait_for(one_pass(orchestrator, clock), 10)
    assert result.placed[first].gpu_uuids == ("GPU-big-0",)
    second = await submit(orchestrator, clock, gpus=1, vram_gb=8)  # now it is free again
    assert (await one_pass(orchestrator, clock)).placed[second].gpu_uuids == ("GPU-small-0",)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_placement_and_ingest_never_wait_for_each_other(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """Ingest writes an agent's row at every heartbeat; placement locks the agent, not
    the row. A placement on an agent whose heartbeat is being written goes ahead (and
    to it: it is the best fit), and a heartbeat of an agent being placed on commits
    while that placement is still open."""
    small = await desktop(orchestrator, "small", (10.0, 10.0))
    await desktop(orchestrator, "big", (24.0, 24.0))
    first = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    async with orchestrator.sessions.begin() as ingest:  # as ingest's batch holds it
        await ingest.execute(
            select(AgentRow.agent_id).where(AgentRow.agent_id == small).with_for_update()
        )
        result = await asyncio.wait_for(one_pass(orchestrator, clock), 10)
    assert result.placed[first].gpu_uuids == ("GPU-small-0",)
    async with orchestrator.sessions.begin() as placing:
        assert [r.agent_id for r in await repo.lock_agents(placing, agent_ids=[small])] == [small]
        clock.advance(1)
        await asyncio.wait_for(desktop(orchestrator, "small", (2.0, 10.0), agent=small), 10)
    async with orchestrator.sessions() as s:
        row = await s.get(AgentRow, small)
    assert row is not None and row.updated_at == clock.now()


async def test_a_job_that_requires_the_sandbox_is_placed_only_where_the_heartbeat_says_full(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """The desktop's sandbox as its last heartbeat said it (`resources.sandbox`) is read by
    placement: a `require_sandbox` job passes the tightest fit that is not sandboxed, and
    waits, saying why, when no full one has room."""
    full = {"processes": "cgroup", "memory_limit": True, "home_hidden": True}
    for name, gpu, sandbox in [
        ("bare", (10.0, 10.0), None),
        ("no-limit", (12.0, 12.0), {**full, "memory_limit": False, "why": ["no cgroup v2"]}),
        ("boxed", (24.0, 24.0), full),
    ]:
        res = f.resources(gpus_free_total=[gpu], load_1min=0.0)
        gpus = [g.model_copy(update={"uuid": f"GPU-{name}-{g.index}"}) for g in res.gpus]
        res = res.model_copy(
            update={"gpus": gpus, "sandbox": sandbox and Sandbox.model_validate(sandbox)}
        )
        msg = f.message(uuid.uuid4(), name=name, res=res)
        assert await orchestrator.receive(msg.model_copy(update={"accepts_jobs": True}))
    anywhere = await submit(orchestrator, clock, gpus=1, vram_gb=8)
    boxed = await submit(orchestrator, clock, gpus=1, vram_gb=8, require_sandbox=True)
    result = await one_pass(orchestrator, clock)
    assert result.placed[anywhere].gpu_uuids == ("GPU-bare-0",)
    assert result.placed[boxed].gpu_uuids == ("GPU-boxed-0",)
    waits = await submit(orchestrator, clock, gpus=1, vram_gb=20, require_sandbox=True)
    await one_pass(orchestrator, clock)
    assert (await job(orchestrator, waits)).reason == (
        "no online agent that accepts jobs and is fully sandboxed has 1 GPU with 20 GB free: "
        "closest is boxed GPU 0 with 16.0 GB; 2 not sandboxed (1 no memory limit, "
        "1 no sandbox reported)"
    )
