"""GPU hygiene: what an ended job may leave on a GPU (processes, memory), found by the
reading (`agent.reading`) and acted on here. A GPU an ended job used is `dirty` (offered
to no new job) until no process of an ended job, nor one that is gone, is listed there and
the memory no listed process holds is back to what it was before the job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable

from chiffon.agent.report import GpuReading
from chiffon.schemas.dispatch import gpu_id

log = logging.getLogger(__name__)

# Memory on a GPU that no listed process holds, above what there was before a job: the
# job's leftover (the GPU stays `dirty` until it is back).
DIRTY_SLACK_GB = 0.25


def gpu_key(gpu: GpuReading) -> str:
    """A GPU's id in claims and orders (`schemas.dispatch.gpu_id`)."""
    return gpu_id(gpu.uuid, gpu.index)


def unaccounted(gpu: GpuReading) -> float | None:
    """Memory in use on the GPU that no listed process holds (the driver's own, and any
    leftover); None when the driver does not say."""
    if gpu.vram_total_gb is None or gpu.vram_free_gb is None:
        return None
    listed = sum(gb for _, gb in gpu.processes or ())
    return max(0.0, gpu.vram_total_gb - gpu.vram_free_gb - listed)


def held_back(now: float | None, before: float | None) -> bool:
    """Whether more memory is held by no process than before the job (beyond the slack)."""
    return now is not None and before is not None and now > before + DIRTY_SLACK_GB


_NOT_DIRTY = object()


class GpuHygiene:
    def __init__(self) -> None:
        # GPU id -> the memory no listed process holds, as read before each job's start
        self.before: dict[str, float | None] = {}
        # GPUs an ended job may have left dirty -> that memory before the job started
        self.dirt: dict[str, float | None] = {}
        self.killed_leftovers = 0  # processes of ended jobs ended by the hygiene check

    def note_before(self, gpu: GpuReading) -> None:
        self.before[gpu_key(gpu)] = unaccounted(gpu)

    def after(self, gpus: Iterable[str]) -> None:
        """An attempt on `gpus` ended: each is checked before it is offered again."""
        for gpu in gpus:
            self.dirt[gpu] = self.before.get(gpu)

    def clean(self, gpu: str) -> None:
        # Two GPUs may share an id (no UUID, the same index from two vendors' numbering):
        # the second reading of it finds it clean already.
        if self.dirt.pop(gpu, _NOT_DIRTY) is not _NOT_DIRTY:
            log.info("GPU %s is clean again", gpu)

    def end_leftover(self, pid: int, gpu: str, attempt: tuple[object, int]) -> None:
        log.warning("process %s of ended attempt %s of %s still holds memory on %s: ending it",
                    pid, attempt[1], attempt[0], gpu)  # fmt: skip
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            self.killed_leftovers += 1
