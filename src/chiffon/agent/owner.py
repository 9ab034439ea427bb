"""The owner's policy and the agent's decision, per GPU: may a new job land here now, and
must the jobs running here leave (docs/owner.md).

Pure: the work loop (`agent.work`) gathers what it sees (the owner's idle time, the local
time, every GPU's foreign processes, its hygiene) into `decide`, and acts on the
`Decision`: it sends the reasons in its heartbeat (the orchestrator places nothing on a
withheld GPU), refuses an order for one, and vacates the jobs on one withheld for a reason
in `VACATING`.

Reasons, in the order they are weighed (the first that holds is the one given):

- desktop-wide: `never` (the owner did not opt in), `root` (the agent runs as root without
  `allow_root_jobs`), `outside_schedule`, `owner_active` (with `when_idle`: the owner used
  the desktop within `idle_minutes`), `owner_unknown` (with `when_idle`, no idle time and
  no schedule to fall back on);
- per GPU: `reserved` (kept by the owner), `unhealthy` (the driver reports it failing),
  the desktop's reason, `exclusive_app` (a program the owner named runs on it),
  `owner_active` (with `on_owner_return: vacate_used_gpus`, the owner is back and their
  programs use this GPU), `dirty` (memory of an ended job not yet back).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from chiffon.schemas.limits import Withheld

# A job on a GPU withheld for one of these goes down the vacate ladder; `reserved`,
# `unhealthy` and `dirty` only keep new jobs off.
VACATING = frozenset({"never", "root", "outside_schedule", "owner_active", "exclusive_app"})
RETURN_MODES = ("vacate_all", "vacate_used_gpus")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")


# Each reason in the owner's words (an order refused, a job vacated, `chiffon probe`).
SAID = {
    "never": "this desktop does not accept jobs",
    "root": "the agent runs as root, and runs jobs as root only with --allow-root-jobs",
    "outside_schedule": "outside the owner's schedule",
    "owner_active": "the desktop's owner is using it",
    "owner_unknown": "the owner's idle time is unknown here (and no schedule is set)",
    "reserved": "the owner keeps this GPU",
    "unhealthy": "the GPU reports errors",
    "exclusive_app": "a program the owner named runs on it",
    "dirty": "memory of an ended job is not back yet",
}


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Window:
    """Days (0 = Monday) and minutes of the day [start, end); an end at or before the start
    runs past midnight into the next day."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        yesterday = (weekday - 1) % 7
        return (weekday in self.days and minute >= self.start) or (
            yesterday in self.days and minute < self.end
        )


@dataclass(frozen=True, slots=True)
class Schedule:
    text: str
    windows: tuple[Window, ...]

    def contains(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        return any(w.contains(local.weekday(), minute) for w in self.windows)


def parse_schedule(text: str) -> Schedule:
    """`mon-fri 19:00-08:00; sat-sun all day` (days: `mon`, `mon-fri`, `fri-mon`,
    `sat,sun`, `daily`; times 24-hour local; `all day`). `ScheduleError` says what is
    wrong, in the owner's words."""
    windows = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        days_text, _, times = part.partition(" ")
        days = _days(days_text.lower())
        times = " ".join(times.split()).lower()
        if times in ("all day", "all-day"):
            windows.append(Window(days, 0, 24 * 60))
            continue
        start_text, sep, end_text = times.partition("-")
        if not sep:
            raise ScheduleError(f"{part!r}: want DAYS HH:MM-HH:MM or DAYS all day")
        start, end = _minute(start_text.strip()), _minute(end_text.strip())
        if start == end:
            raise ScheduleError(f"{part!r}: the window is empty (say 'all day')")
        windows.append(Window(days, start, end))
    if not windows:
        raise ScheduleError("no window (want e.g. 'mon-fri 19:00-08:00; sat-sun all day')")
    return Schedule(text, tuple(windows))


def _days(text: str) -> frozenset[int]:
    if text in ("daily", "every-day", "all"):
        return frozenset(range(7))
    days: set[int] = set()
    for item in text.split(","):
        first, sep, last = item.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise ScheduleError(f"{text!r}: days are mon..sun, a range (mon-fri) or daily")
        a, b = DAYS.index(first), DAYS.index(last) if sep else DAYS.index(first)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _minute(text: str) -> int:
    found = _TIME.match(text)
    if found is None or (found.group(1) == "24" and found.group(2) != "00"):
        raise ScheduleError(f"{text!r} is not a time (HH:MM, 00:00 to 24:00)")
    return int(found.group(1)) * 60 + int(found.group(2))


@dataclass(frozen=True, slots=True)
class OwnerPolicy:
    """What the owner said in agent.yml (agent.settings checks each value)."""

    accept_jobs: str = "never"  # never | when_idle | always
    idle_minutes: float = 15.0
    schedule: Schedule | None = None
    reserve_gpus: frozenset[str] = frozenset()  # indexes ("0") or UUIDs
    exclusive_apps: frozenset[str] = frozenset()  # program names, lower case
    on_owner_return: str = "vacate_all"  # RETURN_MODES
    report_process_names: bool = False


@dataclass(frozen=True, slots=True)
class GpuSeen:
    """One GPU as the decision needs it: its ids, the programs not started by Chiffon that
    hold memory on it (names lower case; None: the driver cannot list them), its health
    and its hygiene."""

    key: str  # the GPU's id in claims and orders
    index: int
    uuid: str | None
    foreign: Sequence[str] | None = ()
    fault: str | None = None
    dirty: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    desktop: Withheld | None  # why no new job lands here now; None: welcome
    gpus: Mapping[str, Withheld | None] = field(default_factory=dict)  # GPU id -> why withheld
    owner_present: bool | None = None  # with when_idle; None: unknown or not asked

    def withheld(self, gpu: str) -> Withheld | None:
        return self.gpus.get(gpu, self.desktop)

    def vacating(self, gpus: Iterable[str]) -> Withheld | None:
        """Why a job on `gpus` (none: a CPU-only job) must leave now, if it must."""
        listed = list(gpus)
        reasons = [self.withheld(g) for g in listed] if listed else [self.desktop]
        return next((r for r in reasons if r in VACATING), None)


def decide(
    policy: OwnerPolicy,
    *,
    local: datetime,
    idle_seconds: float | None,
    gpus: Sequence[GpuSeen],
    root_refused: bool = False,
) -> Decision:
    in_schedule = policy.schedule is None or policy.schedule.contains(local)
    present: bool | None = None
    if policy.accept_jobs == "when_idle" and idle_seconds is not None:
        present = idle_seconds < policy.idle_minutes * 60
    desktop: Withheld | None = None
    if policy.accept_jobs == "never":
        desktop = "never"
    elif root_refused:
        desktop = "root"
    elif not in_schedule:
        desktop = "outside_schedule"
    elif policy.accept_jobs == "when_idle" and present is None and policy.schedule is None:
        desktop = "owner_unknown"  # with a schedule, it alone decides (docs/owner.md)
    elif present and policy.on_owner_return == "vacate_all":
        desktop = "owner_active"
    by_gpu: dict[str, Withheld | None] = {}
    for gpu in gpus:
        by_gpu[gpu.key] = _gpu_reason(policy, gpu, desktop, bool(present))
    return Decision(desktop, by_gpu, present)


def _gpu_reason(
    policy: OwnerPolicy, gpu: GpuSeen, desktop: Withheld | None, present: bool
) -> Withheld | None:
    if (
        gpu.key in policy.reserve_gpus
        or str(gpu.index) in policy.reserve_gpus
        or (gpu.uuid is not None and gpu.uuid in policy.reserve_gpus)
    ):
        return "reserved"
    if gpu.fault is not None:
        return "unhealthy"
    if desktop is not None:
        return desktop
    if gpu.foreign and policy.exclusive_apps.intersection(gpu.foreign):
        return "exclusive_app"
    if present and (gpu.foreign is None or len(gpu.foreign) > 0):
        return "owner_active"  # vacate_used_gpus: the owner's programs use it (or may)
    if gpu.dirty:
        return "dirty"
    return None
