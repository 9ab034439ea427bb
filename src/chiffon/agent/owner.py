"""The owner's policy and the agent's decision, per GPU: may a new job land here now, and
must the jobs running here leave (docs/owner.md).

Pure: the work loop (`agent.work`) gathers what it sees (the owner's idle time, the local
time, every GPU's foreign processes, its hygiene) into `decide`, and acts on the
`Decision`: it sends the reasons in its heartbeat (the orchestrator places nothing on a
withheld GPU), refuses an order for one, and vacates the jobs on one withheld for a reason
in `VACATING`.

Reasons, in the order they are weighed (the first that holds is the one given):

- desktop-wide: `never` (the owner did not opt in), `root` (the agent runs as root without
  `allow_root_jobs`), `unsandboxed` (the owner set `require_sandbox` and a protection is
  missing here), `outside_schedule`, `owner_active` (with `when_idle`: the owner used
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
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from chiffon.agent.declare import (
    Declared,
    boolean,
    count,
    gpus,
    lower_names,
    one_of,
    optional,
    positive,
    seconds,
    strings,
    text,
)
from chiffon.agent.declare import setting as _setting
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
    "root": "the agent runs as root, and runs jobs only with --allow-root-jobs",
    "unsandboxed": "the owner requires the sandbox, and it is not complete here",
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
    """The owner's rules as the decision takes them (`OwnerRules.policy`)."""

    accept_jobs: str = "never"  # never | when_idle | always
    idle_minutes: float = 15.0
    schedule: Schedule | None = None
    reserve_gpus: frozenset[str] = frozenset()  # indexes ("0") or UUIDs
    exclusive_apps: frozenset[str] = frozenset()  # program names, lower case
    on_owner_return: str = "vacate_all"  # RETURN_MODES
    report_process_names: bool = False

    @classmethod
    def of(cls, rules: OwnerRules) -> OwnerPolicy:
        """The policy from the owner's rules: each field by its name, taken as the rule
        says (`setting(take=...)`)."""
        taking = {spec.name: spec.metadata.get("take") for spec in fields(rules)}
        values = {}
        for spec in fields(cls):
            value, take = getattr(rules, spec.name), taking[spec.name]
            values[spec.name] = value if take is None else take(value)
        return cls(**values)


POLICIES = ("never", "when_idle", "always")


def _policy(value: Any) -> str:
    """never | when_idle | always; true and false (a flag, the old boolean) are always and
    never."""
    if isinstance(value, str) and value.strip().lower() in POLICIES:
        return value.strip().lower()
    try:
        return "always" if boolean(value) else "never"
    except ValueError:
        raise ValueError("must be never, when_idle or always (true or false)") from None


def _schedule(value: Any) -> str:
    """Checked here, kept as the owner wrote it (agent.owner.parse_schedule reads it)."""
    if isinstance(value, list | tuple):
        value = "; ".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError("must be windows like 'mon-fri 19:00-08:00; sat-sun all day'")
    try:
        return parse_schedule(value).text
    except ScheduleError as exc:
        raise ValueError(str(exc)) from None


def _parsed(text: str | None) -> Schedule | None:
    return None if text is None else parse_schedule(text)


@dataclass(frozen=True, kw_only=True)
class OwnerRules(Declared):
    """The owner's rules (docs/owner.md), each declared once: name, type, default, check,
    `CHIFFON_*` variable, help. `AgentSettings` reads them from agent.yml, the environment
    and flags; the work loop gets them in its `WorkSettings`; the decision takes them as
    an `OwnerPolicy`. A new rule is a field here, its place in `decide`, and its test."""

    accept_jobs: str = _setting(
        "never", _policy, env="CHIFFON_ACCEPT_JOBS",
        help="Whether this desktop runs jobs (docs/jobs.md): never, when_idle (the owner "
        "away idle_minutes) or always.",
    )  # fmt: skip
    idle_minutes: float = _setting(
        15.0, seconds(1440), env="CHIFFON_IDLE_MINUTES",
        help="With when_idle: minutes without the owner's input before jobs may run.",
    )  # fmt: skip
    schedule: str | None = _setting(
        None, optional(_schedule), env="CHIFFON_SCHEDULE", take=_parsed,
        help="When jobs may run, local time: 'mon-fri 19:00-08:00; sat-sun all day'.",
    )  # fmt: skip
    reserve_gpus: list[str] = _setting(  # noqa: RUF009 (a field: declare.setting)
        factory=list, check=gpus, env="CHIFFON_RESERVE_GPUS", take=frozenset,
        help="GPUs the owner keeps, by index or UUID.",
    )  # fmt: skip
    exclusive_apps: list[str] = _setting(  # noqa: RUF009 (a field: declare.setting)
        factory=list, check=lower_names, env="CHIFFON_EXCLUSIVE_APPS", take=frozenset,
        help="Programs that clear Chiffon off the GPU they use.",
    )  # fmt: skip
    on_owner_return: str = _setting(
        "vacate_all", one_of(*RETURN_MODES), env="CHIFFON_ON_OWNER_RETURN",
        help="What the owner's return clears: every GPU, or only those their programs use.",
    )  # fmt: skip
    # Never for GPU jobs: a stopped process keeps its VRAM.
    cpu_jobs_on_return: str = _setting(
        "vacate", one_of("vacate", "suspend"), env="CHIFFON_CPU_JOBS_ON_RETURN",
        help="A CPU-only job when the owner comes back (or the schedule ends): vacated, or "
        "stopped (SIGSTOP) and continued after.",
    )  # fmt: skip
    report_process_names: bool = _setting(
        False, boolean, env="CHIFFON_REPORT_PROCESS_NAMES",
        help="Names of the programs on the GPUs, in the heartbeat (counts and VRAM always are).",
    )  # fmt: skip
    # The sandbox each job runs in (agent.sandbox, docs/security.md).
    require_sandbox: bool = _setting(
        False, boolean, env="CHIFFON_REQUIRE_SANDBOX",
        help="Refuse jobs unless every protection of the sandbox is in force here (a "
        "control group or PID namespace, a memory limit, the homes hidden).",
    )  # fmt: skip
    jobs_max_memory_gb: float | None = _setting(
        None, optional(positive(1 << 20)), env="CHIFFON_JOBS_MAX_MEMORY_GB",
        help="Memory all jobs together may use, GB. Unset: 90% of the desktop's.",
    )  # fmt: skip
    jobs_max_cores: float | None = _setting(
        None, optional(positive(4096)), env="CHIFFON_JOBS_MAX_CORES",
        help="CPU cores all jobs together may use. Unset: no ceiling (jobs still yield: "
        "the lowest CPU weight, nice 19).",
    )  # fmt: skip
    job_max_processes: int = _setting(
        4096, count(1 << 22), env="CHIFFON_JOB_MAX_PROCESSES",
        help="Processes and threads one job may have at once.",
    )  # fmt: skip
    job_disk_cap_gb: float = _setting(
        50.0, positive(1 << 20), env="CHIFFON_JOB_DISK_CAP_GB",
        help="Disk one attempt's folder (its work and its /tmp) may use, GB; past it the "
        "job is ended.",
    )  # fmt: skip
    keep_attempt_files_seconds: float | None = _setting(
        3600.0, optional(seconds(30 * 86400)), env="CHIFFON_KEEP_ATTEMPT_FILES",
        help="How long an ended attempt's files (its work, its /tmp, its whole log) stay "
        "once its end is heard, seconds; null: removed at once.",
    )  # fmt: skip
    job_user: str = _setting(
        "chiffon-job", text(32), env="CHIFFON_JOB_USER",
        help="An agent run as root runs jobs as this unprivileged user (made if missing).",
    )  # fmt: skip
    job_paths: list[str] = _setting(  # noqa: RUF009 (a field: declare.setting)
        factory=list, check=strings, env="CHIFFON_JOB_PATHS", take=tuple,
        help="Paths every job may read (read-only), though under a hidden folder: a "
        "dataset, a conda install; a --workdir inside one is allowed. Comma separated.",
    )  # fmt: skip

    @property
    def policy(self) -> OwnerPolicy:
        return OwnerPolicy.of(self)


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
    unsandboxed: bool = False,
) -> Decision:
    present: bool | None = None
    if policy.accept_jobs == "when_idle" and idle_seconds is not None:
        present = idle_seconds < policy.idle_minutes * 60
    desktop = _desktop_reason(policy, local, present, root_refused, unsandboxed)
    by_gpu = {gpu.key: _gpu_reason(policy, gpu, desktop, bool(present)) for gpu in gpus}
    return Decision(desktop, by_gpu, present)


def _desktop_reason(
    policy: OwnerPolicy, local: datetime, present: bool | None, root_refused: bool,
    unsandboxed: bool,
) -> Withheld | None:  # fmt: skip
    """The first desktop-wide reason that holds, in the order they are weighed."""
    in_schedule = policy.schedule is None or policy.schedule.contains(local)
    # with a schedule, it alone decides when the idle time is unknown (docs/owner.md)
    unknown = policy.accept_jobs == "when_idle" and present is None and policy.schedule is None
    rules: tuple[tuple[Withheld, bool], ...] = (
        ("never", policy.accept_jobs == "never"),
        ("root", root_refused),
        ("unsandboxed", unsandboxed),
        ("outside_schedule", not in_schedule),
        ("owner_unknown", unknown),
        ("owner_active", bool(present) and policy.on_owner_return == "vacate_all"),
    )
    return next((reason for reason, holds in rules if holds), None)


def _gpu_reason(
    policy: OwnerPolicy, gpu: GpuSeen, desktop: Withheld | None, present: bool
) -> Withheld | None:
    """The first reason that holds for one GPU, in the order they are weighed."""
    foreign = gpu.foreign
    rules: tuple[tuple[Withheld | None, bool], ...] = (
        ("reserved", _reserved(policy, gpu)),
        ("unhealthy", gpu.fault is not None),
        (desktop, desktop is not None),
        (
            "exclusive_app",
            bool(foreign) and bool(policy.exclusive_apps.intersection(foreign or ())),
        ),
        # vacate_used_gpus: the owner's programs use it (or may: the driver lists nothing)
        ("owner_active", present and (foreign is None or len(foreign) > 0)),
        ("dirty", gpu.dirty),
    )
    return next((reason for reason, holds in rules if holds), None)


def _reserved(policy: OwnerPolicy, gpu: GpuSeen) -> bool:
    names = {gpu.key, str(gpu.index)} | ({gpu.uuid} if gpu.uuid is not None else set())
    return not names.isdisjoint(policy.reserve_gpus)
