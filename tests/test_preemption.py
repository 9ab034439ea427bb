"""The orchestrator's side of "the owner comes first", on both engines: a preempted attempt
sends its job back to the queue without using a retry and keeps it off that desktop for a
while; withheld GPUs get no job; long jobs go to the desktops rarely taken back."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import PassResult, schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import AgentEventRow, JobAttemptRow
from chiffon.schemas.dispatch import Report
from tests.jobfleet import desktop
from tests.test_job_lifecycle import STARTED, placed, row, say, submitted

PREEMPTED = Report("ended", "preempted", signal=9,
                   detail="preempted: the desktop's owner is using it (GPU-a-0)")  # fmt: skip


async def test_a_preempted_job_is_queued_again_without_using_a_retry_and_avoids_that_desktop(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    a = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8},
                             retries=0)  # fmt: skip
    await placed(orchestrator, clock)
    assert (await row(orchestrator, job_id)).agent_id == a
    await say(orchestrator, clock, a, job_id, STARTED)
    assert await say(orchestrator, clock, a, job_id, PREEMPTED) == "applied"
    job = await row(orchestrator, job_id)
    assert (job.state, job.retries_used, job.preemptions) == ("queued", 0, 1)
    assert "owner is using it" in job.reason
    async with orchestrator.sessions() as s:
        [attempt] = (await s.scalars(select(JobAttemptRow))).all()
    assert attempt.state == "preempted"

    await placed(orchestrator, clock)  # only desktop a: it waits, and says why
    job = await row(orchestrator, job_id)
    assert job.state == "queued" and "1 avoided (its owner took this job back lately)" in job.reason
    b = await desktop(orchestrator, "b", (24.0, 24.0))
    await placed(orchestrator, clock)
    assert (await row(orchestrator, job_id)).agent_id == b  # elsewhere
    await say(orchestrator, clock, b, job_id, STARTED, attempt=2)
    clock.advance(1000)
    await say(orchestrator, clock, b, job_id, PREEMPTED, attempt=2)
    clock.advance(801)  # a's 30 min (CHIFFON_PREEMPT_AVOID_SECONDS) are over, b's are not
    await placed(orchestrator, clock)
    job = await row(orchestrator, job_id)
    assert (job.agent_id, job.attempt, job.preemptions, job.retries_used) == (a, 3, 2, 0)


async def test_no_job_lands_on_a_withheld_gpu(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    a = await desktop(orchestrator, "a", (24.0, 24.0), (8.0, 24.0), withheld={0: "exclusive_app"})
    big = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 12})
    clock.advance(1)  # placed in submission order: the big one first
    small = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8})
    result = await placed_with_result(orchestrator, clock)
    assert result.placed[small].gpu_uuids == ("GPU-a-1",)
    assert big not in result.placed
    assert result.waiting[big].endswith(
        "closest is a GPU 1 with 8.0 GB; 1 GPU withheld (exclusive_app)"
    )
    assert (await row(orchestrator, small)).agent_id == a


async def test_long_jobs_go_to_the_desktop_rarely_taken_back(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    flaky = await desktop(orchestrator, "flaky", (10.0, 24.0))  # the tighter fit
    steady = await desktop(orchestrator, "steady", (20.0, 24.0))
    async with orchestrator.sessions.begin() as s:
        for days_ago in (1, 2, 9):  # two in the last 7 days; the third is too old to count
            at = clock.now() - timedelta(days=days_ago)
            s.add(AgentEventRow(agent_id=flaky, at=at, from_status="online",
                                to_status="offline", reason="timeout"))  # fmt: skip
    long_job = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8})
    short_job = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8},
                                timeout_seconds=600)  # fmt: skip
    await placed(orchestrator, clock)
    assert (await row(orchestrator, long_job)).agent_id == steady  # reliability first
    assert (await row(orchestrator, short_job)).agent_id == flaky  # best fit first


async def placed_with_result(orch: Orchestrator, clock: ManualClock) -> PassResult:
    return await schedule_once(orch.sessions, now=clock.now())
