"""How an attempt's end is said: saved in its directory first (`ENDED`, 0600), then said
with backoff until the orchestrator hears it (a stopping agent tries a few times: its next
start says it again), then its directory marked `REPORTED`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from chiffon.agent.attempts import ENDED, REPORTED, Attempt, AttemptTable
from chiffon.agent.identity import write_private
from chiffon.agent.runner import Ended, Orphan
from chiffon.backoff import Backoff
from chiffon.schemas.dispatch import ended
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


def ended_from(end: Ended) -> dict[str, Any]:
    """The end report of an attempt's process (`schemas.dispatch.ended`)."""
    return ended(end.reason, end.detail, exit_code=end.exit_code, signal=end.signal,
                 runtime_seconds=end.runtime_seconds)  # fmt: skip


def unheard(
    taken: Iterable[Path], orphans: Iterable[Orphan], table: AttemptTable
) -> list[tuple[Attempt, dict[str, Any]]]:
    """The attempts a previous run took (their directories, `taken`) whose end the
    orchestrator never heard, each entered in `table` as accepted, with the end to say:
    the one saved before a restart wins; else `lost`, as the processes it left (`orphans`,
    ended at this start) say, or unseen."""
    by_orphan = {
        (uuid.UUID(o.job_id), o.attempt): ended(
            "lost", "the agent restarted" + (" and ended it" if o.was_running else "")
        )
        for o in orphans
    }
    found = []
    for attempt_dir in taken:
        key = _attempt_of(attempt_dir.name)
        if key is None or key in table or (attempt_dir / REPORTED).exists():
            continue
        lost = ended("lost", "the agent restarted before its end was said")
        said = read_saved(attempt_dir / ENDED) or by_orphan.get(key) or lost
        found.append((table.add(key, attempt_dir), said))
    return found


def _attempt_of(name: str) -> tuple[uuid.UUID, int] | None:
    """(job, attempt) from an attempt directory's name, `<job_id>-<attempt>`."""
    job_id, _, attempt = name.rpartition("-")
    try:
        return uuid.UUID(job_id), int(attempt)
    except ValueError:
        return None
