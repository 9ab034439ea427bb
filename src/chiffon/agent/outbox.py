"""How an attempt's end is said: saved in its directory first (`ENDED`, 0600), then said
with backoff until the orchestrator hears it (a stopping agent tries a few times: its next
start says it again), then its directory marked `REPORTED`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Protocol

from chiffon.agent.attempts import ENDED, REPORTED, Attempt, AttemptTable
from chiffon.agent.identity import write_private
from chiffon.backoff import Backoff
from chiffon.transport.base import TransportError

log = logging.getLogger(__name__)

# The longest wait between two tries of saying an attempt's end (it is tried until heard);
# a stopping agent tries this many times, then leaves it for its next start.
END_RETRY_MAX_SECONDS = 30.0
STOPPING_TRIES = 3


class Reporter(Protocol):
    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str: ...


class Outbox:
    def __init__(self, table: AttemptTable, channel: Reporter) -> None:
        self._table = table
        self._channel = channel
        self.heard = asyncio.Event()  # set when a report reached the orchestrator
        self.stopping = False
        self.retry_max_seconds = END_RETRY_MAX_SECONDS

    async def save(self, attempt: Attempt, said: dict[str, Any]) -> None:
        """The end written in the attempt's directory, held until heard; the attempt is
        `ended` from now."""
        attempt.said = said
        if attempt.state != "ended":
            self._table.move(attempt, "ended")
        try:
            await asyncio.to_thread(write_private, attempt.directory / ENDED, json.dumps(said))
        except OSError as exc:
            log.warning("the end of attempt %s of %s is not saved: %s", attempt.number,
                        attempt.job_id, exc)  # fmt: skip

    async def say(self, attempt: Attempt, said: dict[str, Any]) -> None:
        """Saved first (unless it is), then said until heard; `reported` once heard."""
        if attempt.state != "ended":
            await self.save(attempt, said)
        most = self.retry_max_seconds
        backoff, tries = Backoff(min(0.5, most), max_seconds=most), 0
        while True:
            try:
                await self._channel.report(*attempt.key, said)
                break
            except TransportError as exc:
                tries += 1
                if self.stopping and tries >= STOPPING_TRIES:
                    return  # said again at the next start
                if tries == 1 or tries % 10 == 0:
                    log.warning(
                        "the end of attempt %s of %s is not heard yet (%s); saying it again "
                        "until it is (%d tries)", attempt.number, attempt.job_id, exc, tries,
                    )  # fmt: skip
                await asyncio.sleep(backoff.delay(tries))
        self.heard.set()
        self._table.move(attempt, "reported")
        with contextlib.suppress(OSError):
            (attempt.directory / REPORTED).touch()


def read_saved(path: Path) -> dict[str, Any] | None:
    """An attempt's saved end (`ENDED`), or None when there is none or it is unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == "ended" else None
