"""An attempt's log, shipped as it grows, in order, until its run ends and all of it is
sent (or the orchestrator says the attempt is not current). Its end is said only once all
its output is shipped (or after `FINISH_SECONDS`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import TaskHook, not_current
from chiffon.agent.runner import JobRun
from chiffon.backoff import Backoff
from chiffon.transport.base import TransportError

log = logging.getLogger(__name__)

LOG_CHUNK_BYTES = 32 * 1024  # under the orchestrator's request body limit (64 KiB)
LOG_SHIP_INTERVAL_SECONDS = 0.25  # a line reaches `chiffon logs -f` within about this
# Output further behind than this is skipped (it stays in the log file on the desktop):
# the orchestrator keeps only a tail anyway.
LOG_MOST_BEHIND_BYTES = 4 * 1024 * 1024
FINISH_SECONDS = 30.0
STOPPING_TRIES = 3


class LogShipping(TaskHook):
    async def exited(self, attempt: Attempt, said: dict[str, Any]) -> None:
        """All its output is shipped before its end is said."""
        if self._task is None or attempt.run is None:
            return
        attempt.run.output.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), FINISH_SECONDS)

    async def beside(self, attempt: Attempt) -> None:
        run = attempt.run
        assert run is not None
        sent, failures, backoff = 0, 0, Backoff(0.25, max_seconds=5.0)
        while True:
            ended = run.finished.is_set()
            sent = max(sent, run.log_bytes - LOG_MOST_BEHIND_BYTES)
            if sent >= run.log_bytes:
                if ended:
                    return
                await _grown(run)
                continue
            chunk = await asyncio.to_thread(_read_at, run.log_path, sent, LOG_CHUNK_BYTES)
            try:
                verdict = await self.parts.channel.ship_log(*attempt.key, sent, chunk)
            except TransportError as exc:
                failures += 1
                if self._gives_up(attempt, ended, failures, exc):
                    return
                await asyncio.sleep(backoff.delay(failures))
                continue
            failures = 0
            if verdict != "applied":
                if not ended:
                    await not_current(attempt)
                return
            sent += len(chunk)

    def _gives_up(self, attempt: Attempt, ended: bool, failures: int, exc: Exception) -> bool:
        """Shipped until heard, as its end (saved already) is: only a stopping agent
        leaves the rest on the desktop, where the whole log stays."""
        if ended and self.parts.outbox.stopping and failures >= STOPPING_TRIES:
            log.warning("output of attempt %s of %s not shipped: %s", attempt.number,
                        attempt.job_id, exc)  # fmt: skip
            return True
        return False


async def _grown(run: JobRun) -> None:
    """Until the log grows (or a moment passes)."""
    run.output.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.output.wait(), LOG_SHIP_INTERVAL_SECONDS)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)
