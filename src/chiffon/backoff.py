"""Waiting between tries: one exponential backoff with jitter, and one retry loop that says
what failed and how many tries are left. Dependency-free: the agent, the transports and
the orchestrator all use it (the agent's loop, its enrollment, the broker connection).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """`initial_seconds`, doubled (`factor`) per attempt up to `max_seconds`, each delay
    scaled down by up to `jitter` at random (so many clients do not retry in step)."""

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        exponent = min(max(0, attempt - 1), 60)  # no overflow however long it has failed
        ceiling = min(self.max_seconds, self.initial_seconds * self.factor**exponent)
        return ceiling * (1 - self.jitter * (rng or random).random())


async def retry(
    what: str,
    attempt_once: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    attempts: int | None = None,
    worth_retrying: Callable[[Exception], bool] = lambda exc: True,
) -> T:
    """Call `attempt_once` until it succeeds, logging each failure and the tries left.

    `attempts=None` retries until cancelled (an orchestrator waiting for its broker); an
    exception that is not `worth_retrying` (a refusal, not an outage) is raised at once.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_once()
        except Exception as exc:
            if not worth_retrying(exc):
                raise
            if attempts is not None and attempt >= attempts:
                log.warning("%s failed (%s); no retries left", what, describe(exc))
                raise
            left = "unlimited" if attempts is None else str(attempts - attempt)
            pause = backoff.delay(attempt)
            log.warning(
                "%s failed (%s); retrying in %.1f s, retries left: %s",
                what,
                describe(exc),
                pause,
                left,
            )
            await asyncio.sleep(pause)


def describe(exc: BaseException) -> str:
    """An exception's type and the first line of what it says."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
