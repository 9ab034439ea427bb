"""An attempt's end says the most VRAM its processes were seen holding, by GPU."""

from __future__ import annotations

from typing import Any

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import AttemptHook


class PeakUsage(AttemptHook):
    async def exited(self, attempt: Attempt, said: dict[str, Any]) -> None:
        if attempt.peak:  # its processes were seen holding VRAM
            said["peak_vram_gb"] = attempt.peak
