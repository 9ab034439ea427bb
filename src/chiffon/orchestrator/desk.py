"""The jobs desk: what users and agents ask of jobs, and who must hear of each answer.

`orchestrator.jobs` decides and writes; the desk calls it and then wakes whoever the
change concerns: the dispatcher (a job queued, an attempt ended), the agent's order
delivery (a cancel to say), the job's log followers (a chunk, an end). It also answers
those followers: a log long-poll waits on the job's bell, asking the database nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any
from uuid import UUID

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from chiffon.orchestrator import jobs
from chiffon.orchestrator.clock import Clock
from chiffon.orchestrator.delivery import OrderDelivery
from chiffon.orchestrator.jobspec import JobSpec
from chiffon.orchestrator.longpoll import Bells, SharedReads, ring_at_notices
from chiffon.orchestrator.placement import Requirements, never_fits
from chiffon.orchestrator.scheduler import could_ever_hold, requirements
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence import jobs as jobs_repo
from chiffon.persistence.models import JobRow
from chiffon.schemas.dispatch import Report, Verdict, is_out
from chiffon.schemas.jobs import JobLog, JobSubmit

HARDWARE_READ_SECONDS = 10.0  # a submission's "could any agent ever hold it" reads this old


class JobDesk:
    """Jobs asked for, cancelled, reported on and followed.

    `sessions` serve submissions and reports, `reader_sessions` the log followers (their
    own connections: a burst of followers never waits for a submission's). `wake` starts a
    dispatcher pass; `orders` is told of an agent with a cancel to hear.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        reader_sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        settings: OrchestratorSettings,
        *,
        wake: Callable[[], None],
        orders: OrderDelivery,
    ) -> None:
        self._sessions, self._reader_sessions = sessions, reader_sessions
        self._clock, self._settings = clock, settings
        self._wake, self._orders = wake, orders
        # A reader following a job's log waits on its bell, bounded per API token.
        self._log_bells = Bells()
        self._log_reads: SharedReads[JobLog | None] = SharedReads()
        self._hardware = _Hardware(sessions)
        self.closing = False  # a stop has begun: hold no long-poll

    async def submit_job(
        self, spec: JobSubmit, *, idempotency_key: str | None = None
    ) -> tuple[UUID, str | None]:
        """Queue a job and wake the dispatcher; with a warning when no registered agent
        could ever hold it (it is kept: a bigger desktop may join). A key given in the
        last day returns its job and creates none (`jobs.submit`)."""
        job_id = await jobs.submit(
            self._sessions, spec, now=self._clock.now(), idempotency_key=idempotency_key
        )
        self._wake()
        want = requirements(JobSpec.parse(spec.model_dump(mode="json")))
        held = await self._hardware.could_ever_hold(want)
        return job_id, None if held else never_fits(want)

    async def cancel_job(self, job_id: UUID) -> str | None:
        """`jobs.cancel`, and the agent running it is told at once (a queued job's log
        followers too: it is over)."""
        state = await jobs.cancel(self._sessions, job_id, now=self._clock.now())
        if state is not None:
            self.log_changed(job_id)
        if state is not None and is_out(state):
            async with self._sessions() as session:
                job = await session.get(JobRow, job_id)
            if job is not None and job.agent_id is not None:
                self._orders.tell(job.agent_id)
        return state

    async def report_attempt(
        self, agent_id: UUID, job_id: UUID, attempt: int, said: Report
    ) -> Verdict:
        """An agent's report of one attempt; an end frees capacity, so the dispatcher runs."""
        verdict = await jobs.report(
            self._sessions, agent_id=agent_id, job_id=job_id, attempt=attempt, said=said,
            now=self._clock.now(),
        )  # fmt: skip
        if verdict == "applied" and said.kind == "ended":
            self._wake()
            self.log_changed(job_id)
        return verdict

    async def ship_log(
        self, agent_id: UUID, job_id: UUID, attempt: int, offset: int, data: bytes
    ) -> Verdict:
        """A chunk of an attempt's output from its agent; readers following it wake."""
        verdict = await jobs.ship_log(
            self._sessions, agent_id=agent_id, job_id=job_id, attempt=attempt, offset=offset,
            data=data, tail_bytes=self._settings.job_log_tail_bytes,
        )  # fmt: skip
        if verdict == "applied":
            self.log_changed(job_id)
        return verdict

    async def read_log(
        self, job_id: UUID, *, attempt: int | None, offset: int, limit: int, wait_seconds: float
    ) -> JobLog | None:
        """Output of the job's attempt (its current one by default) from `offset`; when
        there is none yet and the attempt still runs, wait up to `wait_seconds` for some.
        Waiting asks the database nothing: the job's bell wakes it (a chunk, the attempt's
        end, a cancel; on PostgreSQL from any orchestrator), and then it reads again, one
        read for all the followers asking the same. Reads go through `reader_sessions`.
        None when there is no such job."""
        deadline = time.monotonic() + min(wait_seconds, self._settings.long_poll_max_seconds)
        bell = self._log_bells.bell(job_id)
        key = (job_id, attempt, offset, limit)
        read = partial(self._read_log_once, job_id, attempt, offset, limit)
        while True:
            seen, log = await self._log_reads.read(key, bell, read)
            left = deadline - time.monotonic()
            if log is None or log.data or log.done or left <= 0 or self.closing:
                return log
            await bell.wait(seen, left)

    async def _read_log_once(
        self, job_id: UUID, attempt: int | None, offset: int, limit: int
    ) -> JobLog | None:
        async with self._reader_sessions() as session:
            return await jobs.log_piece(
                session, job_id=job_id, attempt=attempt, offset=offset, limit=limit
            )

    def log_changed(self, job_id: UUID) -> None:
        """This orchestrator committed a change to the job's log: its followers here read
        again (on PostgreSQL the notice of it wakes those of every orchestrator)."""
        self._log_bells.ring(job_id)

    async def follow_log_notices(self, engine: AsyncEngine) -> None:
        """Ring a job's bell at each notice that its log changed (PostgreSQL), whichever
        orchestrator stored the chunk or ended the attempt. While it cannot listen, a
        follower hears this orchestrator's own changes, and another's at the end of its
        wait."""
        await ring_at_notices(partial(jobs_repo.log_changes, engine), self._log_bells, "job-log")

    async def prune_job_logs(self) -> int:
        """Drop the logs of jobs that ended longer ago than the retention (and forget the
        idempotency keys older than a day)."""
        await jobs.forget_idempotency_keys(self._sessions, now=self._clock.now())
        cutoff = self._clock.now() - timedelta(seconds=self._settings.job_log_retention_seconds)
        async with self._sessions.begin() as session:
            return await jobs_repo.prune_logs(session, ended_before=cutoff)

    def close(self) -> None:
        """A stop has begun: every log follower answers now."""
        self.closing = True
        self._log_bells.ring_all()


class _Hardware:
    """The registry's hardware as `could_ever_hold` reads it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._rows: Sequence[Row[Any]] = ()
        self._read_at = -math.inf

    async def could_ever_hold(self, want: Requirements) -> bool:
        """`could_ever_hold` against the registry as read at most `HARDWARE_READ_SECONDS`
        ago (a full read at 10,000 agents costs more than the submission), and against a
        fresh read when that says no: a desktop that could may have just joined."""
        if time.monotonic() - self._read_at < HARDWARE_READ_SECONDS and could_ever_hold(
            want, self._rows
        ):
            return True
        async with self._sessions() as session:
            self._rows = await jobs_repo.agent_rows(session)
        self._read_at = time.monotonic()
        return could_ever_hold(want, self._rows)
