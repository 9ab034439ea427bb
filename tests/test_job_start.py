"""A job's start, on both engines, as `chiffon up` runs it: a real orchestrator, the
agent's work loop on the in-memory transport, real processes. A job that cannot start
fails with the reason in words and where, and no made-up exit code; one that starts says
where its whole output is on the desktop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from chiffon.agent.report import Snapshot
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.orchestrator.service import Orchestrator
from chiffon.schemas.jobs import JobDetail, JobSubmit
from chiffon.transport.memory import InMemoryWork
from tests.auth import API_HEADERS, issue
from tests.conftest import api_client
from tests.jobfleet import desktop
from tests.services import eventually


@asynccontextmanager
async def agent_running(orch: Orchestrator, tmp_path: Path) -> AsyncIterator[Path]:
    """An agent named render-02 that accepts jobs, taking its orders in process (on the
    orchestrator's clock); its jobs' directory."""
    agent_id = await desktop(orch, "render-02")
    credential = await issue(orch, agent_id)
    jobs_dir = tmp_path / "jobs"
    settings = WorkSettings(accept_jobs="always", jobs_dir=jobs_dir, allow_root=True,
                            grace_seconds=0.5)  # fmt: skip

    async def fresh() -> Snapshot:
        return Snapshot()

    channel = InMemoryWork(orch, agent_id)
    work = WorkLoop(settings, agent_id=agent_id, secret=credential.secret, channel=channel,
                    fresh=fresh, clock=lambda: orch.clock.now().timestamp())  # fmt: skip
    polling = asyncio.create_task(work.poll(channel, wait_seconds=0.2))
    try:
        yield jobs_dir
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await work.stop()


async def run_to_end(orch: Orchestrator, **spec: object) -> JobDetail:
    """Submit the job and wait for its end; the job as the API shows it."""
    job_id, _ = await orch.submit_job(JobSubmit.model_validate(spec))
    await orch.dispatcher.tick()  # places it (the test's orchestrator has no dispatch loop)
    async with api_client(orch, API_HEADERS) as user:

        async def shown() -> JobDetail:
            return JobDetail.model_validate((await user.get(f"/api/v1/jobs/{job_id}")).json())

        async def ended() -> bool:
            return (await shown()).ended_at is not None

        await eventually(ended, within_seconds=20)
        return await shown()


async def test_a_workdir_that_does_not_exist_fails_the_job_in_words_without_127(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    async with agent_running(orchestrator, tmp_path):
        job = await run_to_end(orchestrator, command=["true"], workdir="/nonexistent/dir")
    assert (job.state, job.exit_code) == ("failed", None)
    assert job.reason == "the folder /nonexistent/dir does not exist on render-02"
    [attempt] = job.attempts
    assert (attempt.state, attempt.exit_code, attempt.started_at) == ("failed", None, None)
    assert [e.to_state for e in job.events] == ["queued", "assigned", "failed"]


async def test_a_program_that_is_not_there_fails_the_job_in_words_without_127(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    async with agent_running(orchestrator, tmp_path):
        job = await run_to_end(orchestrator, command=["trian.py", "--epochs", "3"])
    assert (job.state, job.exit_code) == ("failed", None)
    assert job.reason == "the program 'trian.py' was not found on render-02"


async def test_a_job_that_runs_says_where_its_whole_output_is(
    orchestrator: Orchestrator, tmp_path: Path
) -> None:
    async with agent_running(orchestrator, tmp_path) as jobs_dir:
        job = await run_to_end(
            orchestrator, command=[sys.executable, "-c", "print('all of it')"],
            workdir=str(tmp_path), env={"TOKEN": "s3cret"},
        )  # fmt: skip
    assert (job.state, job.exit_code, job.workdir, job.env_names) == (
        "succeeded", 0, str(tmp_path), ["TOKEN"]
    )  # fmt: skip
    [attempt] = job.attempts
    assert attempt.log_path == str(jobs_dir / f"{job.job_id}-1" / "output.log")
    assert await asyncio.to_thread(Path(attempt.log_path).read_text) == "all of it\n"
    assert attempt.log_bytes_cut == 0 and job.started_at == attempt.started_at is not None
