"""Nothing lost across a short outage (issue 34, items 5 and 6): the agent saves an
attempt's end and says it until heard, across restarts; its heartbeat lists what it holds,
and the orchestrator ends what is out there and not listed; an outcome heard after the
attempt was judged lost wins. The orchestrator's side on both engines."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from chiffon.agent.work import ENDED, REPORTED
from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.scheduler import schedule_once
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence.models import JobEventRow, JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from chiffon.transport.base import TransportError
from tests import factories as f
from tests.test_work_loop import Orchestrator as FakeOrchestrator
from tests.test_work_loop import loop, order

EXIT_0 = Report("ended", "exit", exit_code=0)


async def placed_job(orch: Orchestrator, clock: ManualClock, retries: int = 0) -> uuid.UUID:
    spec = JobSubmit.model_validate({"command": ["true"], "retries": retries})
    job_id = await jobs.submit(orch.sessions, spec, now=clock.now())
    await schedule_once(orch.sessions, now=clock.now())
    return job_id


async def beat(orch: Orchestrator, agent: uuid.UUID, clock: ManualClock, held: Any) -> None:
    """A heartbeat sent now, saying `held` (None: an agent too old to say)."""
    res = f.resources(cores_physical=8, load_1min=0.0).model_copy(update={"attempts_held": held})
    msg = f.message(agent, name="desk", res=res, sent_at=clock.now())
    assert await orch.receive(msg.model_copy(update={"accepts_jobs": True})) == "applied"


async def job_of(orch: Orchestrator, job_id: uuid.UUID) -> JobRow:
    async with orch.sessions() as s:
        row = await s.get(JobRow, job_id)
    assert row is not None
    return row


async def test_an_attempt_its_agent_no_longer_holds_is_lost_and_placed_again(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    await beat(orchestrator, agent, clock, [])
    job_id = await placed_job(orchestrator, clock, retries=1)
    assert (await job_of(orchestrator, job_id)).state == "assigned"
    clock.advance(10)
    await beat(orchestrator, agent, clock, [])  # may predate the order: not judged
    assert await jobs.lose_forgotten(orchestrator.sessions, now=clock.now()) == []
    clock.advance(30)
    await beat(orchestrator, agent, clock, [f"{job_id}/1"])  # held: left alone
    assert await jobs.lose_forgotten(orchestrator.sessions, now=clock.now()) == []
    clock.advance(15)
    await beat(orchestrator, agent, clock, None)  # an older agent says nothing
    assert await jobs.lose_forgotten(orchestrator.sessions, now=clock.now()) == []
    clock.advance(15)
    await beat(orchestrator, agent, clock, [])  # gone from the desktop
    assert await jobs.lose_forgotten(orchestrator.sessions, now=clock.now()) == [job_id]
    job = await job_of(orchestrator, job_id)
    assert (job.state, job.retries_used, job.agent_id) == ("queued", 1, None)
    async with orchestrator.sessions() as s:
        reasons = (await s.scalars(select(JobEventRow.reason)
                                   .where(JobEventRow.job_id == job_id))).all()  # fmt: skip
    assert any("its desktop no longer has it" in r for r in reasons), reasons


async def test_an_outcome_heard_after_the_attempt_was_judged_lost_wins(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    await beat(orchestrator, agent, clock, None)
    final = await placed_job(orchestrator, clock)  # no retry: lost is its end
    retried = await placed_job(orchestrator, clock, retries=1)  # queued again, one retry used
    for job_id in (final, retried):
        say = jobs.report(orchestrator.sessions, agent_id=agent, job_id=job_id, attempt=1,
                          said=Report("started"), now=clock.now())  # fmt: skip
        assert await say == "applied"
    await jobs.lose_agent(orchestrator.sessions, agent_id=agent, now=clock.now())
    assert [(await job_of(orchestrator, j)).state for j in (final, retried)] == ["lost", "queued"]
    other = uuid.uuid4()  # only the agent that ran it may say how it ended
    for job_id in (final, retried):
        stranger = jobs.report(orchestrator.sessions, agent_id=other, job_id=job_id,
                               attempt=1, said=EXIT_0, now=clock.now())  # fmt: skip
        assert await stranger == "stale"
        late = jobs.report(orchestrator.sessions, agent_id=agent, job_id=job_id, attempt=1,
                           said=EXIT_0, now=clock.now())  # fmt: skip
        assert await late == "applied"
        job = await job_of(orchestrator, job_id)
        assert (job.state, job.exit_code, job.retries_used) == ("succeeded", 0, 0)
    again = jobs.report(orchestrator.sessions, agent_id=agent, job_id=final, attempt=1,
                        said=EXIT_0, now=clock.now())  # fmt: skip
    assert await again == "stale"  # said twice: nothing more changes


async def test_a_late_outcome_changes_nothing_once_a_later_attempt_was_placed(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    await beat(orchestrator, agent, clock, None)
    job_id = await placed_job(orchestrator, clock, retries=1)
    await jobs.lose_agent(orchestrator.sessions, agent_id=agent, now=clock.now())
    await schedule_once(orchestrator.sessions, now=clock.now())  # attempt 2, same desktop
    assert (await job_of(orchestrator, job_id)).attempt == 2
    late = jobs.report(orchestrator.sessions, agent_id=agent, job_id=job_id, attempt=1,
                       said=EXIT_0, now=clock.now())  # fmt: skip
    assert await late == "stale"
    assert (await job_of(orchestrator, job_id)).state == "assigned"


async def test_a_late_outcome_that_asks_for_a_retry_changes_nothing_and_keeps_the_retry_used(
    orchestrator: Orchestrator, clock: ManualClock
) -> None:
    agent = uuid.uuid4()
    await beat(orchestrator, agent, clock, None)
    spec = JobSubmit.model_validate({"command": ["x"], "retries": 1, "retry_on_exit": True})
    job_id = await jobs.submit(orchestrator.sessions, spec, now=clock.now())
    await schedule_once(orchestrator.sessions, now=clock.now())
    await jobs.lose_agent(orchestrator.sessions, agent_id=agent, now=clock.now())
    job = await job_of(orchestrator, job_id)
    assert (job.state, job.retries_used) == ("queued", 1)
    failed = Report("ended", "exit", exit_code=3)  # would be retried: the retry is under way
    late = jobs.report(orchestrator.sessions, agent_id=agent, job_id=job_id, attempt=1,
                       said=failed, now=clock.now())  # fmt: skip
    assert await late == "stale"
    job = await job_of(orchestrator, job_id)
    assert (job.state, job.retries_used) == ("queued", 1)


class Away(FakeOrchestrator):
    """An orchestrator that hears no end while `away` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.away = True
        self.tries = 0

    async def report(self, job_id: uuid.UUID, attempt: int, said: Any) -> str:
        if said["kind"] == "ended" and self.away:
            self.tries += 1
            self.changed.set()
            raise TransportError("connection refused")
        return await super().report(job_id, attempt, said)


async def test_the_agent_says_an_end_until_it_is_heard_and_holds_it_meanwhile(
    tmp_path: Path,
) -> None:
    orch = Away()
    work = loop(tmp_path, orch)
    work.outbox.retry_max_seconds = 0.05  # the tries come quick; their number is the point
    job_id = uuid.uuid4()
    assert await work.handle(*order(job_id))
    attempt_dir = tmp_path / "jobs" / f"{job_id}-1"
    async with asyncio.timeout(30):
        while orch.tries < 20:  # far past the 7 tries after which it gave up
            orch.changed.clear()
            await orch.changed.wait()
    saved = json.loads((attempt_dir / ENDED).read_text())
    assert (saved["outcome"], saved["exit_code"]) == ("exit", 0)
    assert work.held == [f"{job_id}/1"] and not (attempt_dir / REPORTED).exists()
    orch.away = False
    await orch.until(job_id, 2)  # started, then the end
    assert orch.said(job_id) == ["started", "exit"]
    await work.stop()  # its tasks done: the end is marked heard
    assert (attempt_dir / REPORTED).exists() and work.held == []


async def test_an_end_saved_before_a_restart_is_said_after_it_not_lost(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    attempt_dir = tmp_path / "jobs" / f"{job_id}-1"
    attempt_dir.mkdir(parents=True)
    said = {"kind": "ended", "outcome": "exit", "exit_code": 0, "detail": "", "signal": None}
    (attempt_dir / ENDED).write_text(json.dumps(said))
    forgotten = uuid.uuid4()  # taken by the run before, nothing saved: it ended unseen
    (tmp_path / "jobs" / f"{forgotten}-1").mkdir()
    orch = FakeOrchestrator()
    work = loop(tmp_path, orch)
    await work.recover()
    await orch.until(job_id, 1)
    await orch.until(forgotten, 1)
    assert orch.said(job_id) == ["exit"] and orch.said(forgotten) == ["lost"]
    await work.stop()
    assert (attempt_dir / REPORTED).exists()
