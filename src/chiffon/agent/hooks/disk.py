"""An attempt's disk: its folder (its work and its private /tmp) bounded while it runs
(`job_disk_cap_gb`: past it the job is ended, with that reason), and its files removed once
its end is heard (after `keep_attempt_files_seconds`, when the owner keeps them to debug).
The small markers (`ISSUED`, `ENDED`, `REPORTED`) stay: they are how a replayed order is
known."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from pathlib import Path

from chiffon.agent.attempts import REPORTED, Attempt
from chiffon.agent.hooks.base import AttemptHook, TaskHook

log = logging.getLogger(__name__)

DISK_CHECK_SECONDS = 2.0
GB = 1024**3
REMOVED = ("work", "tmp", "output.log", "covered-device", "state.json")


def used_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (allocated blocks; links not followed)."""
    total = 0
    for root, dirs, files in os.walk(folder, onerror=lambda _e: None):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += st.st_blocks * 512
    return total


class DiskCap(TaskHook):
    async def beside(self, attempt: Attempt) -> None:
        run = attempt.run
        assert run is not None
        cap_gb = self.parts.settings.job_disk_cap_gb
        while not run.ending:
            used = await asyncio.to_thread(used_bytes, attempt.directory)
            if used > cap_gb * GB:
                log.warning("attempt %s of %s used %.3g GB of disk, past its cap of %g GB",
                            attempt.number, attempt.job_id, used / GB, cap_gb)  # fmt: skip
                await run.end("exit", f"used more disk than its cap of {cap_gb:g} GB")
                return
            await asyncio.sleep(DISK_CHECK_SECONDS)


class RemoveFiles(AttemptHook):
    async def stop(self, attempt: Attempt) -> None:
        if attempt.state != "reported":  # said again at the next start: kept until then
            return
        keep = self.parts.settings.keep_attempt_files_seconds
        if keep:  # a timer, not a task the agent waits for (a restart: `remove_old`)
            asyncio.get_running_loop().call_later(keep, _remove_soon, attempt.directory)
        else:
            await asyncio.to_thread(remove_files, attempt.directory)


_REMOVING: set[asyncio.Task[None]] = set()


def _remove_soon(folder: Path) -> None:
    task = asyncio.ensure_future(asyncio.to_thread(remove_files, folder))
    _REMOVING.add(task)
    task.add_done_callback(_REMOVING.discard)


def remove_old(jobs_dir: Path, keep_seconds: float | None, now: float) -> int:
    """At start: the files of attempts whose end was heard longer ago than `keep_seconds`
    (a previous run's timers are gone with it); how many attempts'."""
    removed = 0
    for marker in jobs_dir.glob(f"*/{REPORTED}"):
        with contextlib.suppress(OSError):
            if now - marker.stat().st_mtime >= (keep_seconds or 0) and any(
                (marker.parent / name).exists() for name in REMOVED
            ):
                remove_files(marker.parent)
                removed += 1
    return removed


def remove_files(folder: Path) -> None:
    """The attempt's files, whatever modes its job left on them."""
    for name in REMOVED:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=_writable_then_retry)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _writable_then_retry(func, path, _exc) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(OSError):
        parent = os.path.dirname(path)
        os.chmod(parent, stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
        func(path)
