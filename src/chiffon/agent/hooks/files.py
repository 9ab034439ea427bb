"""An attempt's files (`agent.stage`): its snapshot and checkpoint laid in before it starts
(`StageIn`), its checkpoint saved while it runs (`PeriodicCheckpoint`), its outputs and
checkpoint sent back whatever its end (`SaveFiles`: exit, failure, cancel, timeout, or
vacated by the owner, so that its next attempt resumes elsewhere from it).

Stage-in is all or nothing: the manifests are checked (`Manifest.parse`), every blob is
fetched into the cache and checked against its hash, the trees are laid into staging
folders and only then renamed into place. A desktop whose disk cannot hold the files
refuses the attempt (`Refuse`: placed elsewhere); a hostile manifest or a tampered blob
fails it, with one line naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from chiffon.agent.attempts import Attempt
from chiffon.agent.cache import GB, BlobCache, BlobError, free_bytes, same_disk
from chiffon.agent.hooks.base import AttemptHook, Refuse, TaskHook
from chiffon.agent.runner import CannotStart
from chiffon.agent.stage import (
    CHECKPOINT,
    PARALLEL,
    SAVE_MARKER,
    WORK,
    FileChannel,
    lay_out,
    out_matcher,
    remove_tree,
    save_tree,
)
from chiffon.schemas.dispatch import Work
from chiffon.schemas.files import MAX_MANIFEST_BYTES, Manifest, ManifestError
from chiffon.transport.base import TransportError

log = logging.getLogger(__name__)

# Kept free on the disk beyond the job's files: a desktop filled to the last byte helps
# nobody (the job's own writes, the owner's).
DISK_RESERVE_BYTES = 256 * 1024**2
# How long sending an attempt's outputs and checkpoint may hold up the saying of its end.
SAVE_SECONDS = 600.0
# The least time between two saves a job asks for (`CHIFFON_CHECKPOINT_SAVE`).
ASKED_SAVE_SECONDS = 2.0
MARKER_CHECK_SECONDS = 1.0


def _shown(sha: str) -> str:
    return sha[:12]


class StageIn(AttemptHook):
    async def prestart(self, attempt: Attempt) -> None:
        work = attempt.work
        if work is None or (work.snapshot is None and work.checkpoint is None):
            return
        files, cache = self.parts.files, self.parts.cache
        if files is None or cache is None:
            raise Refuse("this desktop cannot fetch a job's files (its agent has no HTTP "
                         "channel to the orchestrator)")  # fmt: skip
        if work.snapshot is not None and work.workdir:
            raise CannotStart("a job with a snapshot runs in its own folder, not in a workdir")
        trees = [(sha, what, folder) for sha, what, folder in (
            (work.snapshot, "snapshot", WORK), (work.checkpoint, "checkpoint", CHECKPOINT))
            if sha is not None]  # fmt: skip
        with cache.pinned(sha for sha, _, _ in trees):
            manifests = [(await self._manifest(attempt, files, cache, sha, what), folder)
                         for sha, what, folder in trees]  # fmt: skip
            needed = {blob for m, _ in manifests for blob in m.blobs()}
            with cache.pinned(needed):
                await self._check_disk(attempt, cache, [m for m, _ in manifests], needed)
                sizes = {e.sha256: e.size for m, _ in manifests for e in m.files}
                await self._fetch_all(attempt, files, cache, sizes)
                for manifest, folder in manifests:
                    await asyncio.to_thread(_lay, manifest, cache, attempt.directory, folder)
        attempt.checkpoint_saved = work.checkpoint  # restored: no need to send it back

    async def _manifest(
        self, attempt: Attempt, files: FileChannel, cache: BlobCache, sha: str, what: str
    ) -> Manifest:
        path = await _fetched(attempt, files, cache, sha, MAX_MANIFEST_BYTES)
        try:
            return Manifest.parse(await asyncio.to_thread(path.read_bytes))
        except ManifestError as exc:
            raise CannotStart(f"the {what}'s manifest {_shown(sha)} is refused: {exc}") from None

    async def _check_disk(self, attempt: Attempt, cache: BlobCache, manifests: list[Manifest],
                          needed: set[str]) -> None:  # fmt: skip
        """Refused when the disk cannot hold the blobs still to fetch and the copies."""
        sizes = {e.sha256: e.size for m in manifests for e in m.files}
        fetched = sum(sizes[sha] for sha in needed if not cache.has(sha))
        copies = sum(m.total_bytes for m in manifests)
        jobs = attempt.directory
        wants = [(jobs, copies + DISK_RESERVE_BYTES)]
        if same_disk(cache.root, jobs):
            wants = [(jobs, copies + fetched + DISK_RESERVE_BYTES)]
        else:
            wants.append((cache.root, fetched + DISK_RESERVE_BYTES))
        for folder, wanted in wants:
            free = await asyncio.to_thread(free_bytes, folder)
            if free < wanted:
                raise Refuse(f"this desktop's disk cannot hold the job's files: "
                             f"{wanted / GB:.3g} GB needed, {free / GB:.3g} GB free")  # fmt: skip

    async def _fetch_all(self, attempt: Attempt, files: FileChannel, cache: BlobCache,
                         sizes: dict[str, int]) -> None:  # fmt: skip
        """Every blob, each held to the size its manifest says (an orchestrator that sends
        more fills no disk)."""
        slots = asyncio.Semaphore(PARALLEL)

        async def one(sha: str) -> None:
            async with slots:
                await _fetched(attempt, files, cache, sha, sizes[sha])

        tasks = [asyncio.create_task(one(sha)) for sha in sorted(sizes)]
        try:
            await asyncio.gather(*tasks)
        finally:  # the first failure ends the rest
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _fetched(
    attempt: Attempt, files: FileChannel, cache: BlobCache, sha: str, max_bytes: int
) -> Path:
    """The blob's path in the cache; a tampered one fails the attempt, one that cannot be
    fetched refuses it (placed again, perhaps where the orchestrator is reachable)."""

    async def fetch(into: Path) -> None:
        await files.fetch_blob(*attempt.key, sha, into, max_bytes=max_bytes)

    try:
        return await cache.get(sha, fetch)
    except BlobError as exc:
        raise CannotStart(str(exc)) from None
    except TransportError as exc:
        raise Refuse(f"the job's file {_shown(sha)} could not be fetched: {exc}") from None


def _lay(manifest: Manifest, cache: BlobCache, attempt_dir: Path, folder: str) -> None:
    """Laid into a staging folder, renamed into place once whole: a refusal leaves
    nothing half-written."""
    staging, final = attempt_dir / f".{folder}-staging", attempt_dir / folder
    remove_tree(staging)
    try:
        lay_out(manifest, cache.path, staging)
    except (ManifestError, OSError) as exc:
        remove_tree(staging)
        raise CannotStart(f"the job's files could not be laid out: {exc}") from None
    remove_tree(final)
    os.rename(staging, final)


# Sending back.


async def save_checkpoint(files: FileChannel, attempt: Attempt) -> None:
    """The checkpoint folder as it is now, sent and recorded (unless unchanged since the
    last save); `TransportError` or `ManifestError` when it could not be."""
    digest = await save_tree(files, attempt.key, attempt.directory / CHECKPOINT, "checkpoint",
                             unless=attempt.checkpoint_saved)  # fmt: skip
    if digest is not None:
        attempt.checkpoint_saved = digest


def job_folder(attempt: Attempt, work: Work) -> Path:
    return Path(work.workdir) if work.workdir else attempt.directory / WORK


class SaveFiles(AttemptHook):
    """At the end, whatever it is: its outputs, then its checkpoint. Bounded in time; a
    failure is logged and the end is said all the same."""

    async def exited(self, attempt: Attempt, said: dict[str, Any]) -> None:
        files, work = self.parts.files, attempt.work
        if files is None or work is None:
            return
        # Only from the attempt's own folder: a workdir is a folder of the desktop's, and
        # the agent (root, perhaps) reads what it sends (`--workdir /etc --out shadow`).
        if work.outputs and not work.workdir:
            await self._bounded(attempt, "outputs", save_tree(
                files, attempt.key, attempt.directory / WORK, "output",
                out_matcher(work.outputs)))  # fmt: skip
        await self._bounded(attempt, "checkpoint", save_checkpoint(files, attempt))

    async def _bounded(self, attempt: Attempt, what: str, saving: Any) -> None:
        try:
            await asyncio.wait_for(saving, SAVE_SECONDS)
        except (TransportError, ManifestError, OSError, TimeoutError) as exc:
            log.warning("attempt %s of %s: its %s were not saved: %s", attempt.number,
                        attempt.job_id, what, exc or type(exc).__name__)  # fmt: skip


def _taken(marker: Path) -> bool:
    """Whether the job asked for a save (the marker is there); the marker removed."""
    if not os.path.lexists(marker):
        return False
    with contextlib.suppress(OSError):
        marker.unlink()
    return True


class PeriodicCheckpoint(TaskHook):
    """While it runs: its checkpoint saved every `checkpoint_every_seconds`, and at once
    when the job creates `CHIFFON_CHECKPOINT_SAVE` (removed, then saved). What a job on a
    desktop that dies resumes from."""

    async def exited(self, attempt: Attempt, said: object) -> None:
        if self._task is not None:  # the last save is SaveFiles': this one ends first
            self._task.cancel()
            await asyncio.wait([self._task])

    async def beside(self, attempt: Attempt) -> None:
        files, work, run = self.parts.files, attempt.work, attempt.run
        if files is None or work is None or run is None:
            return
        every = work.checkpoint_every_seconds
        due = time.monotonic() + every if every else None
        marker = attempt.directory / CHECKPOINT / SAVE_MARKER
        last = -math.inf
        while not run.finished.is_set():
            await asyncio.sleep(MARKER_CHECK_SECONDS)
            # a job asking every moment gets a save every ASKED_SAVE_SECONDS (the store is
            # shared: each save of a changed checkpoint is new bytes in it)
            soon = time.monotonic() - last < ASKED_SAVE_SECONDS
            asked = not soon and await asyncio.to_thread(_taken, marker)
            if asked or (due is not None and time.monotonic() >= due):
                last = time.monotonic()
                await self._save(files, attempt)
                if every:
                    due = time.monotonic() + every

    async def _save(self, files: FileChannel, attempt: Attempt) -> None:
        try:
            await asyncio.wait_for(save_checkpoint(files, attempt), SAVE_SECONDS)
        except (TransportError, ManifestError, OSError, TimeoutError) as exc:
            # a file that changed while it was sent: the orchestrator refused its blob
            log.info("attempt %s of %s: checkpoint not saved this round: %s", attempt.number,
                     attempt.job_id, exc or type(exc).__name__)  # fmt: skip
