"""A job's life on the orchestrator, on both engines: placed, started, ended each way,
cancelled, refused, lost with and without retries, and reports for stale attempts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import Dispatcher, schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import JobAttemptRow, JobClaimRow, JobEventRow, JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from chiffon.schemas.limits import RejectedMessage
from chiffon.transport.orders import Order, order_key, verify
from tests import factories as f
from tests.auth import issue
from tests.jobfleet import desktop
from tests.services import eventually

STARTED = Report("started")


async def submitted(orch: Orchestrator, clock: ManualClock, **fields: Any) -> uuid.UUID:
    spec = JobSubmit.model_validate({"command": ["python", "train.py"], **fields})
    return await jobs.submit(orch.sessions, spec, now=clock.now())


async def placed(orch: Orchestrator, clock: ManualClock) -> None:
    await schedule_once(orch.sessions, now=clock.now())


async def row(orch: Orchestrator, job_id: uuid.UUID) -> JobRow:
    async with orch.sessions() as s:
        found = await s.get(JobRow, job_id)
    assert found is not None
    return found


async def claims_of(orch: Orchestrator, job_id: uuid.UUID) -> int:
    async with orch.sessions() as s:
        return len((await s.scalars(select(JobClaimRow).where(JobClaimRow.job_id == job_id))).all())


async def history(orch: Orchestrator, job_id: uuid.UUID) -> list[str]:
    async with orch.sessions() as s:
        stmt = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
        return [e.to_state for e in (await s.scalars(stmt)).all()]


async def say(orch: Orchestrator, clock: ManualClock, agent: uuid.UUID, job_id: uuid.UUID,
              said: Report, attempt: int = 1) -> str:  # fmt: skip
    return await jobs.report(
        orch.sessions, agent_id=agent, job_id=job_id, attempt=attempt, said=said, now=clock.now()
    )


@pytest.mark.parametrize(
    ("ending", "state", "exit_code"),
    [
        (Report("ended", "exit", exit_code=0), "succeeded", 0),
        (Report("ended", "exit", exit_code=3), "failed", 3),
        (Report("ended", "exit", signal=9), "failed", None),
        (Report("ended", "timed_out", signal=15), "timed_out", None),
        (Report("ended", "cancelled", signal=15), "cancelled", None),
    ],
)
async def test_an_attempt_runs_to_its_end_and_releases_its_claims(
    orchestrator: Orchestrator, clock: ManualClock, ending: Report, state: str,
    exit_code: int | None,
) -> None:  # fmt: skip
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8})
    await placed(orchestrator, clock)
    assert await claims_of(orchestrator, job_id) == 2  # the host and one GPU
    assert await say(orchestrator, clock, agent, job_id, STARTED) == "applied"
    assert await say(orchestrator, clock, agent, job_id, ending) == "applied"
    job = await row(orchestrator, job_id)
    assert (job.state, job.exit_code, job.ended_at is not None) == (state, exit_code, True)
    assert await claims_of(orchestrator, job_id) == 0
    assert await history(orchestrator, job_id) == ["queued", "assigned", "running", state]
    async with orchestrator.sessions() as s:
        attempt = await s.get(JobAttemptRow, (job_id, 1))
    assert attempt is not None and attempt.state == state and attempt.started_at is not None
    # once ended, nothing more about it changes anything
    assert await say(orchestrator, clock, agent, job_id, ending) == "stale"


async def test_reports_of_another_attempt_or_agent_are_stale(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock)
    await placed(orchestrator, clock)
    assert await say(orchestrator, clock, agent, job_id, STARTED, attempt=2) == "stale"
    assert await say(orchestrator, clock, uuid.uuid4(), job_id, STARTED) == "stale"
    assert await say(orchestrator, clock, agent, uuid.uuid4(), STARTED) == "unknown_job"
    assert (await row(orchestrator, job_id)).state == "assigned"


async def test_an_end_heard_before_the_start_still_passes_through_running(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock)
    await placed(orchestrator, clock)
    await say(orchestrator, clock, agent, job_id, Report("ended", "exit", exit_code=0))
    assert await history(orchestrator, job_id) == ["queued", "assigned", "running", "succeeded"]


async def test_a_refused_attempt_goes_back_to_the_queue_and_is_placed_again(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8})
    await placed(orchestrator, clock)
    refused = Report("ended", "refused", detail="VRAM gone on the pre-start check")
    assert await say(orchestrator, clock, agent, job_id, refused) == "applied"
    job = await row(orchestrator, job_id)
    assert (job.state, job.agent_id, job.retries_used) == ("queued", None, 0)
    assert "VRAM gone on the pre-start check" in job.reason
    assert await claims_of(orchestrator, job_id) == 0
    await placed(orchestrator, clock)
    again = await row(orchestrator, job_id)
    assert (again.state, again.attempt) == ("assigned", 2)  # a new fencing token


async def test_a_lost_desktop_requeues_while_retries_remain_then_the_job_is_lost(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, retries=1)
    await placed(orchestrator, clock)
    await say(orchestrator, clock, agent, job_id, STARTED)
    assert await jobs.lose_agent(orchestrator.sessions, agent_id=agent, now=clock.now()) == [job_id]
    job = await row(orchestrator, job_id)
    assert (job.state, job.retries_used) == ("queued", 1)
    await placed(orchestrator, clock)
    await jobs.lose_agent(orchestrator.sessions, agent_id=agent, now=clock.now())
    job = await row(orchestrator, job_id)
    assert (job.state, job.attempt) == ("lost", 2)
    # the partitioned desktop comes back still running attempt 1: told it is stale
    assert await say(orchestrator, clock, agent, job_id, STARTED) == "stale"


async def test_a_non_zero_exit_is_retried_only_when_asked(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    plain = await submitted(orchestrator, clock, retries=2)
    asked = await submitted(orchestrator, clock, retries=2, retry_on_exit=True)
    await placed(orchestrator, clock)
    for job_id in (plain, asked):
        await say(orchestrator, clock, agent, job_id, Report("ended", "exit", exit_code=1))
    assert (await row(orchestrator, plain)).state == "failed"
    assert (await row(orchestrator, asked)).state == "queued"


async def test_a_program_that_never_started_fails_with_the_reason_and_where_and_no_code(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "render-02", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, workdir="/nonexistent/dir")
    await placed(orchestrator, clock)
    never = Report("ended", "exit", detail="the folder /nonexistent/dir does not exist")
    assert await say(orchestrator, clock, agent, job_id, never) == "applied"
    job = await row(orchestrator, job_id)
    assert (job.state, job.exit_code) == ("failed", None)
    assert job.reason == "the folder /nonexistent/dir does not exist on render-02"
    # it never ran: no pass through running, and its attempt has no start
    assert await history(orchestrator, job_id) == ["queued", "assigned", "failed"]
    async with orchestrator.sessions() as s:
        attempt = await s.get(JobAttemptRow, (job_id, 1))
    assert attempt is not None and (attempt.state, attempt.started_at) == ("failed", None)
    assert (attempt.exit_code, attempt.reason) == (None, job.reason)
    assert await claims_of(orchestrator, job_id) == 0


async def test_a_start_failure_is_retried_elsewhere_only_when_exits_are(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    plain = await submitted(orchestrator, clock, retries=1)
    asked = await submitted(orchestrator, clock, retries=1, retry_on_exit=True)
    await placed(orchestrator, clock)
    never = Report("ended", "exit", detail="the program 'trian.py' was not found")
    for job_id in (plain, asked):
        await say(orchestrator, clock, agent, job_id, never)
    assert (await row(orchestrator, plain)).state == "failed"
    retried = await row(orchestrator, asked)
    assert retried.state == "queued"
    assert retried.reason == "the program 'trian.py' was not found on a; retrying"


async def test_a_reason_longer_than_its_column_is_cut_not_refused(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock)
    await placed(orchestrator, clock)
    await say(orchestrator, clock, agent, job_id, STARTED)
    said = Report("ended", "exit", exit_code=2, detail="x" * 1000)
    assert await say(orchestrator, clock, agent, job_id, said) == "applied"
    job = await row(orchestrator, job_id)
    assert (job.state, len(job.reason)) == ("failed", 1000)


async def test_cancel_is_immediate_when_queued_marked_when_out_and_idempotent(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    queued = await submitted(orchestrator, clock)
    assert await jobs.cancel(orchestrator.sessions, queued, now=clock.now()) == "cancelled"
    assert await jobs.cancel(orchestrator.sessions, queued, now=clock.now()) == "cancelled"
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    out = await submitted(orchestrator, clock)
    await placed(orchestrator, clock)
    assert await jobs.cancel(orchestrator.sessions, out, now=clock.now()) == "assigned"
    marked = (await row(orchestrator, out)).cancel_requested_at
    assert marked is not None
    clock.advance(5)
    await jobs.cancel(orchestrator.sessions, out, now=clock.now())
    assert (await row(orchestrator, out)).cancel_requested_at == marked  # asked once
    await say(orchestrator, clock, agent, out, Report("ended", "cancelled", signal=15))
    assert (await row(orchestrator, out)).state == "cancelled"
    assert await jobs.cancel(orchestrator.sessions, uuid.uuid4(), now=clock.now()) is None


async def test_attempts_on_an_agent_gone_offline_are_lost_at_the_next_pass(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    job_id = await submitted(orchestrator, clock, retries=1)
    await orchestrator.dispatcher.tick()
    await say(orchestrator, clock, agent, job_id, STARTED)
    await orchestrator.receive(f.message(agent, kind="offline"))  # its goodbye
    result = await orchestrator.dispatcher.tick()
    job = await row(orchestrator, job_id)
    # lost, then (a retry left, but no other agent) waiting in the queue again
    assert (job.state, job.retries_used, job_id in result.waiting) == ("queued", 1, True)
    assert await history(orchestrator, job_id) == [
        "queued", "assigned", "running", "queued"
    ]  # fmt: skip


async def test_the_dispatcher_places_a_job_as_soon_as_it_is_woken(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "a", (24.0, 24.0))
    dispatcher = Dispatcher(orchestrator.sessions, clock, interval_seconds=3600)
    running = asyncio.create_task(dispatcher.run())
    try:
        job_id = await submitted(orchestrator, clock)
        dispatcher.wake()
        # placed within seconds, not at the hour-long tick
        await eventually(lambda: _assigned(orchestrator, job_id), within_seconds=5)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_queue_longer_than_a_pass_reads_is_placed_without_waiting_for_the_next_tick(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    await desktop(orchestrator, "a", (24.0, 24.0))
    # a pass reads one queued job; the next tick is an hour away
    dispatcher = Dispatcher(orchestrator.sessions, clock, interval_seconds=3600, limit=1)
    job_ids = [await submitted(orchestrator, clock) for _ in range(3)]
    running = asyncio.create_task(dispatcher.run())
    try:
        dispatcher.wake()
        for job_id in job_ids:
            await eventually(lambda j=job_id: _assigned(orchestrator, j), within_seconds=5)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def _assigned(orch: Orchestrator, job_id: uuid.UUID) -> bool:
    return (await row(orch, job_id)).state == "assigned"


async def test_an_agent_is_told_its_assignments_and_cancels_each_signed_with_its_key(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    credential = await issue(orchestrator, agent)
    key = order_key(credential.secret)
    job_id = await submitted(
        orchestrator, clock, requirements={"gpus": 1, "vram_gb": 8}, env={"EPOCHS": "3"}
    )
    assert await orchestrator.orders_for(agent) == []  # queued: nothing to tell yet
    await placed(orchestrator, clock)

    def read(signed: tuple[bytes, str]) -> Order:
        return verify(*signed, key=key, agent_id=agent, now=clock.now().timestamp())

    [assign] = [read(o) for o in await orchestrator.orders_for(agent)]
    assert (assign.kind, assign.job_id, assign.attempt) == ("assign", job_id, 1)
    assert assign.payload["command"] == ["python", "train.py"]
    assert assign.payload["env"] == {"EPOCHS": "3"}
    assert (assign.payload["gpu_uuids"], assign.payload["vram_gb"]) == (["GPU-a-0"], 8.0)
    await say(orchestrator, clock, agent, job_id, STARTED)
    assert await orchestrator.orders_for(agent) == []  # started: nothing more to tell
    await jobs.cancel(orchestrator.sessions, job_id, now=clock.now())
    [cancel] = [read(o) for o in await orchestrator.orders_for(agent)]
    assert (cancel.kind, cancel.job_id, cancel.attempt) == ("cancel", job_id, 1)
    await orchestrator.credentials.revoke(agent)
    with pytest.raises(RejectedMessage, match="revoked"):
        await orchestrator.orders_for(agent)  # no key, no order: nothing goes out unsigned


async def test_a_desktop_that_stops_accepting_hands_back_what_has_not_started(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    """Its owner came back (or it restarted without jobs): an attempt not yet started goes
    back to the queue, no retry used; one already running stays the agent's to end."""
    agent = await desktop(orchestrator, "a", (24.0, 24.0))
    waiting = await submitted(orchestrator, clock)
    running = await submitted(orchestrator, clock)
    await placed(orchestrator, clock)
    assert await say(orchestrator, clock, agent, running, STARTED) == "applied"
    beat = f.message(agent, name="a", res=f.resources(gpus_free_total=[(24.0, 24.0)]))
    assert await orchestrator.receive(beat.model_copy(update={"accepts_jobs": False})) == "applied"
    await jobs.lose_offline(orchestrator.sessions, now=clock.now())
    handed = await row(orchestrator, waiting)
    assert (handed.state, handed.retries_used) == ("queued", 0)
    assert "stopped accepting jobs" in handed.reason
    assert (await row(orchestrator, running)).state == "running"
