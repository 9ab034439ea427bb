"""Backfill past any number of jobs that cannot be placed (issue 34, item 8), on both
engines: the scheduler groups the queue by shape, tries a shape once, tries it again only
when an agent changes so that it could fit there, and still tells every waiting job why
it waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import BATCH, FleetCache, PassResult, schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import JobRow
from chiffon.schemas.jobs import JobSubmit
from tests import factories as f
from tests.jobfleet import desktop

BLOCKED = 20_000
FOUR_GPUS = "no online agent that accepts jobs has 4 GPUs"


def spec(**requirements: object) -> dict[str, Any]:
    submit = JobSubmit.model_validate({"command": ["train"], "requirements": requirements})
    return submit.model_dump(mode="json")


async def queue_in_bulk(orch: Orchestrator, clock: ManualClock, n: int, **wants: object) -> None:
    """`n` jobs queued in one statement, a millisecond apart, the newest a second ago (as
    `jobs.submit` writes them, less their events)."""
    document, first = spec(**wants), clock.now() - timedelta(seconds=1 + n / 1000)
    rows = [
        {"job_id": uuid.uuid4(), "name": None, "state": "queued", "reason": "",
         "spec": document, "attempt": 0, "retries_used": 0, "preemptions": 0,
         "submitted_at": (at := first + timedelta(milliseconds=i)), "updated_at": at}
        for i in range(n)
    ]  # fmt: skip
    async with orch.sessions.begin() as s:
        await s.execute(insert(JobRow), rows)


async def submit(orch: Orchestrator, clock: ManualClock, **wants: object) -> uuid.UUID:
    job_id = uuid.uuid4()
    async with orch.sessions.begin() as s:
        await repo.add_job(s, job_id=job_id, name=None, spec=spec(**wants), now=clock.now())
    clock.advance(0.001)
    return job_id


async def state(orch: Orchestrator, job_id: uuid.UUID) -> tuple[str, str]:
    async with orch.sessions() as s:
        job = await s.get(JobRow, job_id)
    assert job is not None
    return job.state, job.reason


async def told(orch: Orchestrator, reason_starts: str) -> int:
    """Queued jobs whose reason starts so."""
    stmt = select(func.count()).where(
        JobRow.state == "queued", JobRow.reason.startswith(reason_starts)
    )
    async with orch.sessions() as s:
        return int(await s.scalar(stmt) or 0)


async def one_pass(orch: Orchestrator, clock: ManualClock, **kwargs: Any) -> PassResult:
    return await schedule_once(orch.sessions, now=clock.now(), **kwargs)


@pytest.mark.parametrize(
    ("wants", "why"),
    [({"gpus": 4}, FOUR_GPUS), ({"pool": "nowhere"}, "no online agent that accepts jobs in")],
    ids=["4-gpus", "no-such-pool"],
)
async def test_a_small_job_is_placed_within_a_second_behind_20000_that_fit_nowhere(
    orchestrator: Orchestrator, clock: ManualClock, wants: dict[str, object], why: str
) -> None:
    """20,000 jobs ask for 4 GPUs of a pool whose one desktop has 2 (or for a pool that
    does not exist). A job asking for one GPU is placed within a second of its submission
    (the dispatcher's loop, woken by the submission, as in the orchestrator), and every
    one of the 20,000 says why it waits."""
    await desktop(orchestrator, "a", (24.0, 24.0), (24.0, 24.0))
    await queue_in_bulk(orchestrator, clock, BLOCKED, **wants)
    await orchestrator.dispatcher.tick()  # the passes over the blocked queue have begun
    running = asyncio.create_task(orchestrator.dispatcher.run())
    try:
        submitted_at = time.monotonic()
        small, _ = await orchestrator.submit_job(
            JobSubmit.model_validate({"command": ["train"], "requirements": {"gpus": 1}})
        )
        while (await state(orchestrator, small))[0] == "queued":
            assert time.monotonic() - submitted_at < 1.0, "not placed within 1 s"
            await asyncio.sleep(0.01)
        placed_after = time.monotonic() - submitted_at
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert (await state(orchestrator, small))[0] == "assigned", placed_after
    assert await told(orchestrator, why) == BLOCKED


async def test_a_shape_that_missed_is_tried_again_only_when_an_agent_could_now_hold_it(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    cache = FleetCache()
    await desktop(orchestrator, "two", (24.0, 24.0), (24.0, 24.0))
    big = await submit(orchestrator, clock, gpus=4)
    first = await one_pass(orchestrator, clock, cache=cache)
    assert first.waiting[big].startswith(FOUR_GPUS) and first.blocked == 0
    # another desktop with two GPUs: room, but not for it; the job is not read again
    await desktop(orchestrator, "other", (24.0, 24.0), (24.0, 24.0))
    second = await one_pass(orchestrator, clock, cache=cache)
    assert (big not in second.waiting, second.blocked, second.placed) == (True, 1, {})
    assert second.waits
    # a desktop with four: it is tried again, and placed
    await desktop(orchestrator, "four", *[(24.0, 24.0)] * 4)
    assert big in (await one_pass(orchestrator, clock, cache=cache)).placed


async def test_a_job_not_read_is_told_its_reason_and_the_reason_follows_the_fleet(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """Jobs of a shape that missed before are not read one by one; those queued since, and
    the others once the reason changed, are told in one statement."""
    cache = FleetCache()
    agent = await desktop(orchestrator, "two", (24.0, 24.0), (24.0, 24.0))
    await queue_in_bulk(orchestrator, clock, 100, gpus=4)
    await one_pass(orchestrator, clock, cache=cache)
    assert await told(orchestrator, FOUR_GPUS) == 100
    await queue_in_bulk(orchestrator, clock, 50, gpus=4)  # of the shape known to miss
    result = await one_pass(orchestrator, clock, cache=cache)
    assert (result.waiting, result.blocked) == ({}, 150)
    assert await told(orchestrator, FOUR_GPUS) == 150
    # the desktop goes away: the reason says so (a new FleetCache: told again at once)
    await orchestrator.receive(f.message(agent, kind="offline"))
    await one_pass(orchestrator, clock, cache=FleetCache())
    assert await told(orchestrator, f"{FOUR_GPUS}; 1 agent offline") == 150


async def test_a_reason_that_changed_is_written_to_many_jobs_at_most_every_ten_seconds(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """Rewriting 20,000 rows costs the database about a second: a shape's jobs told its
    reason are told a newer one no sooner than 10 s after, but those read one by one (the
    first transaction's) and a job told nothing yet are told at once."""
    seconds = [0.0]
    cache = FleetCache(full_read_seconds=1, monotonic=lambda: seconds[0])  # each shape
    agent = await desktop(orchestrator, "two", (24.0, 24.0), (24.0, 24.0))  # tried again
    await queue_in_bulk(orchestrator, clock, 100, gpus=4)
    await one_pass(orchestrator, clock, cache=cache)
    assert await told(orchestrator, FOUR_GPUS) == 100
    await orchestrator.receive(f.message(agent, kind="offline"))
    offline = f"{FOUR_GPUS}; 1 agent offline"
    seconds[0] = 5.0
    newest = await submit(orchestrator, clock, gpus=4)
    await one_pass(orchestrator, clock, cache=cache)
    assert (await state(orchestrator, newest))[1] == offline
    assert await told(orchestrator, offline) == 1 + BATCH
    seconds[0] = 10.0
    await one_pass(orchestrator, clock, cache=cache)
    assert await told(orchestrator, offline) == 101


async def test_the_oldest_job_guards_against_starvation_though_its_shape_is_not_read(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    cache = FleetCache()
    await desktop(orchestrator, "a", (10.0, 24.0))  # 14 GB held by something else
    large = await submit(orchestrator, clock, gpus=1, vram_gb=20)
    small = await submit(orchestrator, clock, gpus=1, vram_gb=2)
    result = await one_pass(orchestrator, clock, cache=cache, starvation_seconds=300)
    assert small in result.placed and large in result.waiting  # backfill
    clock.advance(301)
    later = await submit(orchestrator, clock, gpus=1, vram_gb=2)
    result = await one_pass(orchestrator, clock, cache=cache, starvation_seconds=300)
    # the large one is not read (its shape missed and nothing changed), yet it reserves
    assert large not in result.waiting and later in result.waiting, result


async def test_a_job_that_could_never_fit_reserves_no_desktop(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """The starvation guard keeps room free for a job that room could fit: not for one
    that asks more than any desktop has, which would otherwise stop all placement on the
    desktop closest to it once it had waited long enough."""
    await desktop(orchestrator, "two", (24.0, 24.0), (24.0, 24.0))
    never = await submit(orchestrator, clock, gpus=4)
    clock.advance(301)
    small = await submit(orchestrator, clock, gpus=1, vram_gb=2)
    result = await one_pass(orchestrator, clock, starvation_seconds=300)
    assert never in result.waiting and small in result.placed


async def test_jobs_that_miss_only_for_a_reserved_desktop_are_passed_over_too(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """A desktop reserved for a starving job is left out of the pass: the jobs that only
    it could hold miss as one shape, not one by one, so a pass that chooses for three
    jobs (one a transaction) still reaches the job another pool can take."""
    await desktop(orchestrator, "a", (10.0, 24.0), pool="a")
    await desktop(orchestrator, "b", (24.0, 24.0), pool="b")
    large = await submit(orchestrator, clock, gpus=1, vram_gb=20, pool="a")
    clock.advance(301)
    only_a = [await submit(orchestrator, clock, gpus=1, vram_gb=2, pool="a") for _ in range(3)]
    other = await submit(orchestrator, clock, gpus=1, vram_gb=2, pool="b")
    result = await one_pass(orchestrator, clock, limit=3, batch=1, starvation_seconds=300)
    assert other in result.placed and large in result.waiting
    assert all(j in result.waiting for j in only_a)
