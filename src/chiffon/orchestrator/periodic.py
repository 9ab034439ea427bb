"""One periodic loop for the orchestrator's chores (offline sweep, history pruning)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def run_every(
    interval_seconds: float, chore: Callable[[], Awaitable[Any]], what: str
) -> None:
    """Run `chore` forever on a monotonic schedule; a failed pass is logged and retried.

    Keeps the cadence, but never tries to catch up on passes missed while the database
    was down.
    """
    next_at = time.monotonic()
    while True:
        try:
            await chore()
        except Exception as exc:  # database down: the next pass will try again
            log.warning("%s failed: %s", what, exc)
        next_at = max(next_at + interval_seconds, time.monotonic())
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
