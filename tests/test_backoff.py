"""The one backoff and retry loop the agent, the transports and the orchestrator share."""

from __future__ import annotations

import random

import pytest

from chiffon.backoff import Backoff, retry


def test_delays_double_up_to_the_cap_and_jitter_only_shortens_them() -> None:
    backoff = Backoff(initial_seconds=0.5, max_seconds=15.0, jitter=0.5)
    rng = random.Random(7)
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (6, 15.0), (10_000, 15.0)):
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling, attempt
    assert Backoff(jitter=0).delay(3) == 2.0


async def test_retry_tries_again_until_it_works_and_says_how_many_are_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "done"

    fast = Backoff(initial_seconds=0.001, max_seconds=0.002)
    assert await retry("connecting", flaky, backoff=fast, attempts=5) == "done"
    assert len(calls) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("connecting failed (ConnectionError: refused); retrying in")
    assert lines[0].endswith("retries left: 4") and lines[1].endswith("retries left: 3")


async def test_retry_gives_up_after_its_attempts_and_at_once_on_a_refusal() -> None:
    calls: list[int] = []

    async def down() -> None:
        calls.append(1)
        raise ConnectionError("down")

    fast = Backoff(initial_seconds=0.001, max_seconds=0.002)
    with pytest.raises(ConnectionError):
        await retry("x", down, backoff=fast, attempts=3)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionError):
        await retry("x", down, backoff=fast, attempts=3, worth_retrying=lambda e: False)
    assert len(calls) == 1
