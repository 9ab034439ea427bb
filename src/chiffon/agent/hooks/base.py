"""What an attempt hook is and what it is given (`agent.attempt_runner` sequences them).

A hook is one concern of an attempt (its log shipped, its GPUs checked after it, its end
saved), run at the attempt's named points, like the hooks of Nomad's task runner:

- `prestart`: before its process starts (stage-in goes here); raising `CannotStart` ends
  the attempt as failed to start, with that reason; raising `Refuse` ends it `refused`
  (this desktop cannot take it now, a full disk: the orchestrator places it elsewhere);
- `poststart`: its process runs;
- `exited`: its process ended; `said` is the end about to be said (a hook may add to it);
- `stop`: always, last, whatever happened (cleanup).

A new hook is one module with a subclass of `AttemptHook`, registered in
`agent.hooks.HOOKS`; each attempt gets its own instance of every hook, so per-attempt
state lives on the instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chiffon.agent.attempts import Attempt
    from chiffon.agent.cache import BlobCache
    from chiffon.agent.hygiene import GpuHygiene
    from chiffon.agent.outbox import Outbox
    from chiffon.agent.report import Snapshot
    from chiffon.agent.stage import FileChannel
    from chiffon.agent.work import WorkChannel, WorkSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HookParts:
    """The parts of the agent a hook may use."""

    settings: WorkSettings
    channel: WorkChannel
    outbox: Outbox
    hygiene: GpuHygiene
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[None]]
    last_reading: Callable[[], Snapshot | None]  # the machine as last read, before the start
    # How an attempt's files move (`agent.stage`), and where its blobs are kept; None where
    # the channel cannot move files (`InMemoryWork`): an attempt with files is refused.
    files: FileChannel | None = None
    cache: BlobCache | None = None


class Refuse(Exception):
    """A prestart hook's word that this desktop cannot take the attempt now (its disk
    cannot hold the job's files): it ends `refused`, with this reason, and the
    orchestrator places the job elsewhere."""


class AttemptHook:
    """One concern of an attempt; each point is a no-op unless overridden."""

    def __init__(self, parts: HookParts) -> None:
        self.parts = parts

    async def prestart(self, attempt: Attempt) -> None:
        return None

    async def poststart(self, attempt: Attempt) -> None:
        return None

    async def exited(self, attempt: Attempt, said: dict[str, Any]) -> None:
        return None

    async def stop(self, attempt: Attempt) -> None:
        return None


async def not_current(attempt: Attempt) -> None:
    """The orchestrator says the attempt is no longer its job's current one: end it."""
    log.warning("attempt %s of %s is no longer the job's current one here: ending it",
                attempt.number, attempt.job_id)  # fmt: skip
    if attempt.run is not None:
        await attempt.run.end(
            "lost", "no longer its job's current attempt (placed again elsewhere)"
        )


class TaskHook(AttemptHook):
    """A hook that runs `beside(attempt)` as a task from poststart, cancelled at stop."""

    _task: asyncio.Task[None] | None = None

    async def beside(self, attempt: Attempt) -> None:
        raise NotImplementedError

    async def poststart(self, attempt: Attempt) -> None:
        self._task = asyncio.create_task(self.beside(attempt))

    async def stop(self, attempt: Attempt) -> None:
        if self._task is not None:
            self._task.cancel()
