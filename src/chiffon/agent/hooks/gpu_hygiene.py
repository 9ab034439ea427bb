"""GPU hygiene around an attempt: before it starts, the memory no listed process holds on
each of its GPUs is noted; after it, those GPUs are checked (`agent.hygiene`) before they
are offered again."""

from __future__ import annotations

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import AttemptHook
from chiffon.agent.hygiene import gpu_key


class GpuHygieneHook(AttemptHook):
    async def prestart(self, attempt: Attempt) -> None:
        reading = self.parts.last_reading()
        assert attempt.run is not None
        wanted = set(attempt.run.assignment.gpu_uuids)
        for gpu in reading.gpus if reading is not None else ():
            if gpu_key(gpu) in wanted:
                self.parts.hygiene.note_before(gpu)

    async def stop(self, attempt: Attempt) -> None:
        if attempt.run is not None and attempt.run.pid is not None:  # it ran
            self.parts.hygiene.after(attempt.run.assignment.gpu_uuids)
