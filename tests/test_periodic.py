"""The orchestrator's periodic chores survive a failed pass and keep their cadence."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from chiffon.orchestrator.periodic import run_every


async def test_a_failed_pass_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes: list[float] = []

    async def chore() -> None:
        passes.append(time.monotonic())
        if len(passes) == 2:
            raise ConnectionRefusedError("database is down")

    task = asyncio.create_task(run_every(0.05, chore, "offline sweep"))
    with caplog.at_level(logging.WARNING):
        while len(passes) < 4:  # noqa: ASYNC110  # polled counter
            await asyncio.sleep(0.01)
    task.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(passes)]
    assert min(gaps) > 0.04, gaps  # a failure does not make it spin or catch up
    assert "offline sweep failed: database is down" in caplog.text
