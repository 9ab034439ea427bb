"""Orchestrators that do not place (`--no-dispatch`), and PostgreSQL's queue notices.

The placing orchestrator's tick here is an hour, so only a notice (migration 0012's
triggers, heard by `Orchestrator._follow_queue`) can make it place in time: these tests
fail if the triggers or the listener stop working, or if `dispatch=False` still places.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.persistence.models import Base, JobRow
from chiffon.schemas.dispatch import Report
from chiffon.schemas.jobs import JobSubmit
from tests.auth import SECRET_KEY
from tests.jobfleet import desktop
from tests.services import eventually

HOUR = 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


@pytest.fixture
async def pair(
    postgres_url: str, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[tuple[Orchestrator, Orchestrator]]:
    """(serving, placing) on one PostgreSQL registry: the first started with
    `dispatch=False`, the second placing only when woken (its tick is an hour)."""
    settings = OrchestratorSettings(
        database_url=postgres_url, data_dir=tmp_path, secret_key=SECRET_KEY,  # type: ignore[arg-type]
        history_enabled=False,
    )  # fmt: skip
    serving = Orchestrator(settings.model_copy(update={"dispatch": False}), clock=clock)
    placing = Orchestrator(settings, clock=clock)
    placing.dispatcher.interval_seconds = HOUR
    async with serving.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(table.delete())
    for orch in (serving, placing):
        await orch.start()
    await asyncio.sleep(0.5)  # the placing one is listening
    yield serving, placing
    for orch in (serving, placing):
        await orch.stop()


async def state(orch: Orchestrator, job_id: uuid.UUID) -> str:
    async with orch.sessions() as s:
        found = await s.get(JobRow, job_id)
    assert found is not None
    return found.state


async def submit(orch: Orchestrator, vram_gb: float) -> uuid.UUID:
    spec = JobSubmit.model_validate(
        {"command": ["train"], "requirements": {"gpus": 1, "vram_gb": vram_gb}}
    )
    job_id, _ = await orch.submit_job(spec)
    return job_id


async def test_a_job_submitted_where_nothing_places_is_placed_at_once_by_an_orchestrator_that_does(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    serving, _placing = pair
    await desktop(serving, "a", (24.0, 24.0))
    job_id = await submit(serving, 4)
    await eventually(lambda: _is(serving, job_id, "assigned"), within_seconds=5)


async def test_room_made_by_an_attempt_ended_elsewhere_is_used_at_once(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    serving, _placing = pair
    agent = await desktop(serving, "a", (24.0, 24.0))
    first = await submit(serving, 20)
    await eventually(lambda: _is(serving, first, "assigned"), within_seconds=5)
    second = await submit(serving, 20)  # no room for it while the first holds the GPU
    await asyncio.sleep(1)
    assert await state(serving, second) == "queued"
    # The first ends, reported to the orchestrator that does not place.
    for said in (Report("started"), Report("ended", "exit", exit_code=0)):
        assert await serving.report_attempt(agent, first, 1, said) == "applied"
    await eventually(lambda: _is(serving, second, "assigned"), within_seconds=5)


async def test_an_orchestrator_started_without_dispatch_places_nothing(
    postgres_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    settings = OrchestratorSettings(
        database_url=postgres_url, data_dir=tmp_path, secret_key=SECRET_KEY,  # type: ignore[arg-type]
        history_enabled=False, dispatch=False,
    )  # fmt: skip
    serving = Orchestrator(settings, clock=clock)
    async with serving.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(table.delete())
    await serving.start()
    try:
        await desktop(serving, "a", (24.0, 24.0))
        job_id = await submit(serving, 4)
        # its dispatcher, were it running, is woken by the submission and ticks each second
        await asyncio.sleep(2.5)
        assert await state(serving, job_id) == "queued"
    finally:
        await serving.stop()


async def _is(orch: Orchestrator, job_id: uuid.UUID, expected: str) -> bool:
    return await state(orch, job_id) == expected
