"""7. Chaos, shortened (bench/chaos.py runs it for 10 minutes): two orchestrators, a
simulated fleet taking jobs and a real agent, while agents die, an orchestrator is
SIGKILLed and started again and the broker restarts; then every job is accounted for,
from the database's own history. And that history check finds what it looks for."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from bench.chaos import Run, chaos, check_history
from sqlalchemy import update

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.persistence import jobs as repo
from chiffon.persistence.models import JobRow
from tests.conftest import fresh_postgres_database
from tests.jobfleet import desktop


@pytest.mark.timeout(300)
def test_a_short_chaos_run_accounts_for_every_job(tmp_path: Path) -> None:
    run = Run(minutes=1.0, jobs=80, agents=40, real_agents=1, kill_every=15, settle=90,
              die_fraction=0.05)  # fmt: skip
    said: list[str] = []
    with fresh_postgres_database() as url:
        chaos(run, url, tmp_path, say=said.append)
        history = check_history(url)
    assert history.ok, (history.summary(), said)
    assert history.jobs == run.counts["submitted"] == 80
    assert run.counts["orchestrator_killed"] == run.counts["broker_restarted"] == 1
    assert run.counts["real_agents_killed"] >= 2 and run.counts["in_flight_at_the_end"] == 0
    assert set(history.states) <= {"succeeded", "failed", "lost", "queued"}, history.states
    assert history.states["succeeded"] >= 60, history.summary()


async def test_the_history_check_finds_each_thing_it_looks_for(
    orchestrator: Orchestrator, clock: ManualClock, database_url: str
) -> None:
    """Written straight into the database, as no scheduler would: two 8 GB attempts on
    one 10 GB GPU at once, a job with two attempts out at once, a job lost without an
    event, and one still running."""
    agent = await desktop(orchestrator, "one", (10.0, 10.0), cores=8)
    spec = {"command": ["x"], "requirements": {"gpus": 1, "vram_gb": 8.0, "cpu_cores": 1}}
    ids = [uuid.uuid4() for _ in range(3)]
    async with orchestrator.sessions.begin() as s:
        rows = [await repo.add_job(s, job_id=j, name=None, spec=spec, now=clock.now())
                for j in ids]  # fmt: skip
        for row in rows[:2]:
            repo.assign(s, job=row, agent_id=agent, gpus=[("GPU-one-0", 8.0)], cpu_cores=1,
                        memory_gb=0, now=clock.now())  # fmt: skip
        await s.flush()
        row = rows[0]
        row.state = "queued"  # as if its first attempt had ended, but it never did
        repo.assign(s, job=row, agent_id=agent, gpus=[], cpu_cores=1, memory_gb=0,
                    now=clock.now() + timedelta(seconds=1))  # fmt: skip
        await s.execute(update(JobRow).where(JobRow.job_id == ids[2]).values(state="lost"))
    history = check_history(database_url)
    found = {kind: len(v) for kind, v in history.violations.items() if v}
    assert found == {"gpu_overbooked": 1, "two_attempts_at_once": 1, "state_without_event": 1,
                     "not_settled": 2}, history.summary()  # fmt: skip
