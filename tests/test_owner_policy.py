"""The owner's policy, decided per GPU (agent.owner): the schedule's windows, when_idle and
its fallback, reserved GPUs, exclusive apps, what the owner's return clears, hygiene."""

from __future__ import annotations

from datetime import datetime

import pytest

from chiffon.agent.owner import (
    Decision,
    GpuSeen,
    OwnerPolicy,
    ScheduleError,
    decide,
    parse_schedule,
)
from chiffon.agent.settings import SettingsError, load_settings

# 2026-11-30 is a Monday
MON_20H = datetime(2026, 11, 30, 20, 0)
TUE_07H = datetime(2026, 12, 1, 7, 59)
TUE_08H = datetime(2026, 12, 1, 8, 0)
SAT_NOON = datetime(2026, 12, 5, 12, 0)
SAT_07H = datetime(2026, 12, 5, 7, 0)  # the night from Friday
SUN_23H = datetime(2026, 12, 6, 23, 59)
MON_07H = datetime(2026, 11, 30, 7, 0)  # the night from Sunday: not in mon-fri 19-08


@pytest.mark.parametrize(
    ("when", "inside"),
    [(MON_20H, True), (TUE_07H, True), (TUE_08H, False), (SAT_NOON, True), (SAT_07H, True),
     (SUN_23H, True), (MON_07H, False), (datetime(2026, 12, 2, 12, 0), False)],
)  # fmt: skip
def test_a_schedule_is_windows_in_local_time_and_a_night_ends_the_next_day(
    when: datetime, inside: bool
) -> None:
    schedule = parse_schedule("mon-fri 19:00-08:00; sat-sun all day")
    assert schedule.contains(when) is inside


def test_day_lists_wrapping_ranges_and_daily() -> None:
    assert parse_schedule("fri-mon 00:00-24:00").contains(MON_07H)
    assert not parse_schedule("fri-mon 00:00-24:00").contains(TUE_08H)
    assert parse_schedule("tue,sat 08:00-09:00").contains(TUE_08H)
    assert parse_schedule("daily 07:00-07:30").contains(SAT_07H)


@pytest.mark.parametrize(
    ("text", "said"),
    [("mon-fri", "want DAYS HH:MM-HH:MM"), ("moon 10:00-11:00", "days are mon..sun"),
     ("mon 25:00-26:00", "is not a time"), ("mon 10:00-10:00", "empty"), (" ; ", "no window")],
)  # fmt: skip
def test_a_bad_schedule_says_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ScheduleError, match=said):
        parse_schedule(text)


def test_a_bad_schedule_in_agent_yml_is_one_line_naming_it(tmp_path: object) -> None:
    with pytest.raises(
        SettingsError, match=r"bad setting schedule = 'weekends' \(from env CHIFFON_SCHEDULE\)"
    ):
        load_settings(environ={"CHIFFON_SCHEDULE": "weekends"})
    loaded = load_settings(environ={"CHIFFON_RESERVE_GPUS": "0, GPU-x",
                                    "CHIFFON_EXCLUSIVE_APPS": "Blender,steam",
                                    "CHIFFON_CHECKPOINT_SIGNAL": "usr2"})  # fmt: skip
    s = loaded.settings
    assert (s.reserve_gpus, s.exclusive_apps, s.checkpoint_signal) == (
        ["0", "GPU-x"], ["blender", "steam"], "SIGUSR2")  # fmt: skip
    with pytest.raises(SettingsError, match=r"checkpoint_signal.*a signal a job can catch"):
        load_settings(environ={"CHIFFON_CHECKPOINT_SIGNAL": "SIGKILL"})


GPU0 = GpuSeen("GPU-0", 0, "GPU-0")
GPU1 = GpuSeen("GPU-1", 1, "GPU-1")


def _decide(policy: OwnerPolicy, idle: float | None, *gpus: GpuSeen, at: datetime = MON_20H,
            root: bool = False) -> Decision:  # fmt: skip
    return decide(policy, local=at, idle_seconds=idle, gpus=list(gpus or (GPU0, GPU1)),
                  root_refused=root)  # fmt: skip


def test_when_idle_waits_for_idle_minutes_and_the_owners_return_takes_back_everything() -> None:
    policy = OwnerPolicy(accept_jobs="when_idle", idle_minutes=15)
    away = _decide(policy, 15 * 60)
    assert away.desktop is None and away.gpus == {"GPU-0": None, "GPU-1": None}
    back = _decide(policy, 3)
    assert back.desktop == "owner_active" and back.owner_present
    assert back.vacating(["GPU-1"]) == "owner_active" and back.vacating([]) == "owner_active"
    assert _decide(policy, None).desktop == "owner_unknown"  # no idle time, no schedule: no


def test_without_an_idle_time_the_schedule_alone_decides() -> None:
    policy = OwnerPolicy(accept_jobs="when_idle", schedule=parse_schedule("mon-fri 19:00-08:00"))
    assert _decide(policy, None, at=MON_20H).desktop is None
    left = _decide(policy, None, at=TUE_08H)
    assert left.desktop == "outside_schedule" and left.vacating(["GPU-0"]) == "outside_schedule"
    assert _decide(policy, 3, at=MON_20H).desktop == "owner_active"  # known: it counts too


def test_always_keeps_to_the_schedule_and_never_and_root_refuse() -> None:
    schedule = parse_schedule("sat-sun all day")
    assert _decide(OwnerPolicy(accept_jobs="always"), 0).desktop is None
    assert _decide(OwnerPolicy("always", schedule=schedule), 0).desktop == "outside_schedule"
    assert _decide(OwnerPolicy("always", schedule=schedule), 0, at=SAT_NOON).desktop is None
    assert _decide(OwnerPolicy(accept_jobs="never"), 9999).desktop == "never"
    assert _decide(OwnerPolicy(accept_jobs="always"), 9999, root=True).desktop == "root"


def test_a_reserved_gpu_is_never_offered_and_named_by_index_or_uuid() -> None:
    by_index = _decide(OwnerPolicy("always", reserve_gpus=frozenset({"0"})), 0)
    assert by_index.gpus == {"GPU-0": "reserved", "GPU-1": None}
    by_uuid = _decide(OwnerPolicy("always", reserve_gpus=frozenset({"GPU-1"})), 0)
    assert by_uuid.gpus == {"GPU-0": None, "GPU-1": "reserved"}
    assert by_uuid.vacating(["GPU-1"]) is None  # reserved keeps new jobs off, vacates none


def test_an_exclusive_app_clears_only_the_gpu_it_runs_on() -> None:
    policy = OwnerPolicy("always", exclusive_apps=frozenset({"blender"}))
    gaming = GpuSeen("GPU-0", 0, "GPU-0", foreign=("xorg", "blender"))
    d = _decide(policy, 0, gaming, GpuSeen("GPU-1", 1, "GPU-1", foreign=("firefox",)))
    assert d.gpus == {"GPU-0": "exclusive_app", "GPU-1": None}
    assert d.vacating(["GPU-0"]) == "exclusive_app" and d.vacating(["GPU-1"]) is None


def test_vacate_used_gpus_keeps_jobs_on_the_gpus_the_owner_does_not_use() -> None:
    policy = OwnerPolicy("when_idle", on_owner_return="vacate_used_gpus")
    used = GpuSeen("GPU-0", 0, "GPU-0", foreign=("game",))
    unseen = GpuSeen("GPU-2", 2, "GPU-2", foreign=None)  # the driver lists nothing: maybe
    d = _decide(policy, 2, used, GPU1, unseen)
    assert d.desktop is None and d.owner_present
    assert d.gpus == {"GPU-0": "owner_active", "GPU-1": None, "GPU-2": "owner_active"}
    assert d.vacating(["GPU-1"]) is None and d.vacating([]) is None
    assert _decide(policy, 3600, used).gpus == {"GPU-0": None}  # away: shared by the VRAM rule


def test_unhealthy_and_dirty_gpus_keep_new_jobs_off_without_vacating() -> None:
    policy = OwnerPolicy("always")
    d = _decide(policy, 0, GpuSeen("GPU-0", 0, "GPU-0", fault="GPU is lost"),
                GpuSeen("GPU-1", 1, "GPU-1", dirty=True))  # fmt: skip
    assert d.gpus == {"GPU-0": "unhealthy", "GPU-1": "dirty"}
    assert d.vacating(["GPU-0"]) is None and d.vacating(["GPU-1"]) is None
