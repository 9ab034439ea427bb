"""While an attempt runs, ask now and then whether it is still its job's current one: a
desktop cut off long enough to be judged offline finds, once back, that its job was placed
again (the report is answered `stale`) and ends its own attempt."""

from __future__ import annotations

import asyncio

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import TaskHook, not_current
from chiffon.schemas.dispatch import alive
from chiffon.transport.base import TransportError


class AliveCheck(TaskHook):
    async def exited(self, attempt: Attempt, said: object) -> None:
        await self.stop(attempt)

    async def beside(self, attempt: Attempt) -> None:
        run = attempt.run
        assert run is not None
        while not run.finished.is_set():
            await asyncio.sleep(self.parts.settings.alive_check_seconds)
            try:
                verdict = await self.parts.channel.report(*attempt.key, alive())
            except TransportError:
                continue  # cut off: the orchestrator judges; we ask again
            if verdict in ("stale", "unknown_job"):
                await not_current(attempt)
                return
