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
import subprocess
from pathlib import Path

from chiffon.agent.attempts import REPORTED, Attempt
from chiffon.agent.hooks.base import AttemptHook, TaskHook

log = logging.getLogger(__name__)

DISK_CHECK_SECONDS = 2.0
BLOCK = 4096
GB = 1024**3
REMOVE_SECONDS = 600.0
REMOVED = ("work", "checkpoint", "tmp", "output.log", "covered-device", "state.json",
           ".work-staging", ".checkpoint-staging")  # fmt: skip


def used_bytes(folder: Path) -> int:
    """Bytes the files under `folder` take on disk: allocated blocks, each entry counted as
    at least one block (so a million empty files or links are not free). Walked without
    recursion (a job may nest folders thousands deep) and without following links."""
    total, stack = 0, [str(folder)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    total += max(st.st_blocks * 512, BLOCK)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


class DiskCap(TaskHook):
    async def beside(self, attempt: Attempt) -> None:
        run = attempt.run
        assert run is not None
        cap_gb = self.parts.settings.job_disk_cap_gb
        while not run.ending:
            used = 0
            for folder in ("work", "checkpoint", "tmp"):
                used += await asyncio.to_thread(used_bytes, attempt.directory / folder)
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
        with contextlib.suppress(OSError):  # (remove_files itself never raises)
            if now - marker.stat().st_mtime >= (keep_seconds or 0) and any(
                (marker.parent / name).exists() for name in REMOVED
            ):
                remove_files(marker.parent)
                removed += 1
    return removed


def remove_files(folder: Path) -> None:
    """The attempt's files, whatever its job left there: modes taken away, folders nested
    thousands deep (`rm`, which walks without recursion; links are removed, never
    followed). A failure is logged, never raised: the agent goes on."""
    paths = [str(folder / name) for name in REMOVED if os.path.lexists(folder / name)]
    if not paths:
        return
    try:  # give the agent's user back the right to remove what the job locked
        subprocess.run(["chmod", "-R", "u+rwX", "--", *paths], capture_output=True,
                       timeout=REMOVE_SECONDS, check=False)  # fmt: skip
        done = subprocess.run(["rm", "-rf", "--one-file-system", "--", *paths],
                              capture_output=True, text=True, timeout=REMOVE_SECONDS,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the files of %s were not removed: %s", folder.name, exc)
        return
    if done.returncode != 0:
        log.warning("the files of %s were not all removed: %s", folder.name,
                    done.stderr.strip()[-300:])  # fmt: skip
