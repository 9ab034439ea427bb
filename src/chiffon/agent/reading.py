"""A reading of the machine that only reads: each GPU's processes split into this agent's
jobs' (a process is a job's when it is in the job's process group, or its environment
names a job of this agent) and foreign ones, the leftovers of ended jobs found and the
hygiene of each GPU judged. Nothing is ended, vacated or reported here: the work loop acts
on a `Reading` (`WorkLoop.observe`), `chiffon probe` only shows it."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import psutil

from chiffon.agent.hygiene import gpu_key, held_back, unaccounted
from chiffon.agent.owner import GpuSeen
from chiffon.agent.report import GpuReading, Snapshot
from chiffon.schemas.limits import clean_text

Key = tuple[uuid.UUID, int]


@dataclass(frozen=True, slots=True)
class Jobs:
    """What the reading knows of this agent's attempts: the process group of each running
    one, the ones ended lately, and the GPUs that may be dirty (with the memory no process
    held before the job)."""

    groups: Mapping[int, Key] = field(default_factory=dict)
    ended: Collection[Key] = ()
    dirt: Mapping[str, float | None] = field(default_factory=dict)
    members: Mapping[int, Key] = field(default_factory=dict)  # pid: its unit's attempt


@dataclass(slots=True)
class Reading:
    snapshot: Snapshot  # per GPU: its jobs' use and the foreign use
    seen: list[GpuSeen]  # its GPUs as the owner's decision takes them
    used: dict[Key, dict[str, float]]  # VRAM each running attempt holds, by GPU
    leftovers: list[tuple[int, str, Key]]  # (pid, GPU, attempt) of ended attempts
    clean: list[str]  # GPUs that were dirty and are clean again


@dataclass(slots=True)
class _Gpu:
    names: list[str] = field(default_factory=list)
    foreign_gb: float = 0.0
    jobs_gb: float = 0.0
    leftovers: int = 0


def read(snapshot: Snapshot, jobs: Jobs = Jobs(), *, show_names: bool = False) -> Reading:
    """`snapshot` read against this agent's attempts (none: every process is foreign)."""
    used: dict[Key, dict[str, float]] = {key: {} for key in jobs.groups.values()}
    reading = Reading(snapshot, [], used, [], [])
    gpus = [_read_gpu(gpu, jobs, reading, show_names) for gpu in snapshot.gpus]
    reading.snapshot = dataclasses.replace(snapshot, gpus=gpus)
    return reading


def _read_gpu(gpu: GpuReading, jobs: Jobs, reading: Reading, show_names: bool) -> GpuReading:
    gid = gpu_key(gpu)
    seen = _Gpu()
    for pid, gb in gpu.processes or ():
        _sort(pid, gb, gid, jobs, reading, seen)
    if gpu.processes is not None:
        gpu = dataclasses.replace(
            gpu, jobs_vram_used_gb=round(seen.jobs_gb, 3), foreign_processes=len(seen.names),
            foreign_vram_gb=round(seen.foreign_gb, 3),
            foreign_names=tuple(sorted(seen.names)) if show_names else None,
        )  # fmt: skip
    dirty = gid in jobs.dirt and (seen.leftovers > 0 or held_back(unaccounted(gpu), jobs.dirt[gid]))
    if gid in jobs.dirt and not dirty:
        reading.clean.append(gid)
    names = seen.names if gpu.processes is not None else None
    reading.seen.append(GpuSeen(gid, gpu.index, gpu.uuid, names, gpu.fault, dirty))
    return gpu


def _sort(pid: int, gb: float, gid: str, jobs: Jobs, reading: Reading, seen: _Gpu) -> None:
    """One process on a GPU: a running job's, an ended job's leftover, or foreign."""
    key = whose(pid, jobs)
    if key in reading.used:
        by_gpu = reading.used[key]
        by_gpu[gid] = round(by_gpu.get(gid, 0.0) + gb, 3)
        seen.jobs_gb += gb
    elif key is not None and key in jobs.ended:
        seen.leftovers += 1
        reading.leftovers.append((pid, gid, key))
    elif gid in jobs.dirt and _gone(pid):
        seen.leftovers += 1  # memory of a process that is gone: not back yet
    else:
        seen.names.append(_program(pid))
        seen.foreign_gb += gb


def whose(pid: int, jobs: Jobs) -> Key | None:
    """The attempt a GPU process belongs to: by its unit (agent.sandbox: whatever it
    started, wherever it went), else by its process group, else by the attempt its
    environment names (a process that left the group, `setsid`, still carries it), if
    that attempt is one of this agent's, running or ended."""
    if pid in jobs.members:
        return jobs.members[pid]
    group = _group_of(pid)
    if group is not None and group in jobs.groups:
        return jobs.groups[group]
    named = _attempt_named(pid)
    running = named in jobs.groups.values()
    return named if running or named in jobs.ended else None


def _gone(pid: int) -> bool:
    """Whether the process has ended (a zombie has: it holds nothing but its exit code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _attempt_named(pid: int) -> Key | None:
    """The attempt named in a process's environment (CHIFFON_JOB_ID, CHIFFON_ATTEMPT);
    None when it names none or cannot be read (another user's process)."""
    try:
        env = psutil.Process(pid).environ()
        return uuid.UUID(env["CHIFFON_JOB_ID"]), int(env["CHIFFON_ATTEMPT"])
    except (psutil.Error, KeyError, ValueError, OSError):
        return None


def _program(pid: int) -> str:
    """A process's program name, lower case ("?" when it cannot be read). Any local user
    names their own processes: control characters are blanked, the length bounded."""
    try:
        return clean_text(psutil.Process(pid).name().lower()[:64]).strip() or "?"
    except psutil.Error:
        return "?"


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:  # gone, or another namespace's pid
        return None
