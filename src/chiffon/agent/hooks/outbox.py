"""An attempt's end is saved in its directory before it is said (`agent.outbox`): kept
from then on, whatever comes, and said again across restarts until heard."""

from __future__ import annotations

from typing import Any

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import AttemptHook


class SaveEnd(AttemptHook):
    async def exited(self, attempt: Attempt, said: dict[str, Any]) -> None:
        await self.parts.outbox.save(attempt, said)
